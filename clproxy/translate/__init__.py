"""Pure translators between the Claude Messages API and other providers' APIs."""
