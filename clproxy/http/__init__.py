"""The daemon's HTTP face: the resource tree, the Anthropic routes and the OpenAI front door."""
