"""The load the benchmark sends: a ~20 KB Claude-Code-like Messages request and its headers.

One source for every client of the benchmark (wrk via the files :func:`write_files` produces, and
the stream client by import), so the direct and the through-proxy paths see the same bytes.

``python benchmarks/payload.py DIR`` writes ``body.json``, ``body-stream.json`` and ``headers.txt``
into DIR (what ``wrk_messages.lua`` reads when run by hand).
"""

import json
import os
import sys

BODY_TARGET_BYTES = 20 * 1024
MODEL = "claude-sonnet-4-5-20250929"

# What Claude Code (the Anthropic TypeScript SDK underneath) sends. The client's key is replaced by
# the proxy with the account's; it deliberately does not look like a real key.
HEADERS = [
    ("accept", "application/json"),
    ("anthropic-beta", "claude-code-20250219,interleaved-thinking-2025-05-14,"
                       "fine-grained-tool-streaming-2025-05-14"),
    ("anthropic-dangerous-direct-browser-access", "true"),
    ("anthropic-version", "2023-06-01"),
    ("content-type", "application/json"),
    ("user-agent", "claude-cli/2.0.14 (external, cli)"),
    ("x-api-key", "bench-client-key-not-a-secret"),
    ("x-app", "cli"),
    ("x-stainless-arch", "x64"),
    ("x-stainless-lang", "js"),
    ("x-stainless-os", "Linux"),
    ("x-stainless-package-version", "0.60.0"),
    ("x-stainless-retry-count", "0"),
    ("x-stainless-runtime", "node"),
    ("x-stainless-runtime-version", "v22.17.0"),
    ("x-stainless-timeout", "600"),
    ("accept-encoding", "gzip, deflate, br, zstd"),
    ("connection", "keep-alive"),
]


def _schema(properties, required):
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}


def _tools():
    s = {"type": "string"}
    return [
        {"name": "Bash", "description": (
            "Executes a given bash command in a persistent shell session with optional timeout, "
            "ensuring proper handling and security measures.\n\nBefore executing the command, please "
            "follow these steps:\n1. Directory Verification:\n   - If the command will create new "
            "directories or files, first use the LS tool to verify the parent directory exists\n"
            "2. Command Execution:\n   - Always quote file paths that contain spaces with double quotes\n"
            "   - After ensuring proper quoting, execute the command.\n\nUsage notes:\n  - The command "
            "argument is required.\n  - You can specify an optional timeout in milliseconds (up to "
            "600000ms / 10 minutes).\n  - If the output exceeds 30000 characters, output will be "
            "truncated before being returned to you.\n  - VERY IMPORTANT: You MUST avoid using search "
            "commands like `find` and `grep`. Instead use Grep, Glob, or Task to search."),
         "input_schema": _schema({
             "command": {**s, "description": "The command to execute"},
             "timeout": {"type": "number", "description": "Optional timeout in milliseconds (max 600000)"},
             "description": {**s, "description": "Clear, concise description of what this command does "
                                                 "in 5-10 words."},
             "run_in_background": {"type": "boolean", "description": "Set to true to run this command "
                                                                     "in the background."}},
             ["command"])},
        {"name": "Glob", "description": (
            "- Fast file pattern matching tool that works with any codebase size\n- Supports glob "
            "patterns like \"**/*.js\" or \"src/**/*.ts\"\n- Returns matching file paths sorted by "
            "modification time\n- Use this tool when you need to find files by name patterns"),
         "input_schema": _schema({
             "pattern": {**s, "description": "The glob pattern to match files against"},
             "path": {**s, "description": "The directory to search in. Defaults to the current "
                                          "working directory."}}, ["pattern"])},
        {"name": "Grep", "description": (
            "A powerful search tool built on ripgrep\n\n  Usage:\n  - ALWAYS use Grep for search tasks. "
            "NEVER invoke `grep` or `rg` as a Bash command.\n  - Supports full regex syntax (e.g., "
            "\"log.*Error\", \"function\\\\s+\\\\w+\")\n  - Filter files with glob parameter or type "
            "parameter\n  - Output modes: \"content\" shows matching lines, \"files_with_matches\" shows "
            "only file paths (default), \"count\" shows match counts"),
         "input_schema": _schema({
             "pattern": {**s, "description": "The regular expression pattern to search for in file "
                                             "contents"},
             "path": {**s, "description": "File or directory to search in. Defaults to current "
                                          "working directory."},
             "glob": {**s, "description": "Glob pattern to filter files (e.g. \"*.js\")"},
             "output_mode": {"type": "string", "enum": ["content", "files_with_matches", "count"],
                             "description": "Output mode"},
             "-i": {"type": "boolean", "description": "Case insensitive search"},
             "-n": {"type": "boolean", "description": "Show line numbers in output"},
             "-A": {"type": "number", "description": "Number of lines to show after each match"},
             "-B": {"type": "number", "description": "Number of lines to show before each match"},
             "head_limit": {"type": "number", "description": "Limit output to first N lines/entries"},
             "multiline": {"type": "boolean", "description": "Enable multiline mode"}}, ["pattern"])},
        {"name": "Read", "description": (
            "Reads a file from the local filesystem. You can access any file directly by using this "
            "tool.\n\nUsage:\n- The file_path parameter must be an absolute path, not a relative path\n"
            "- By default, it reads up to 2000 lines starting from the beginning of the file\n- You can "
            "optionally specify a line offset and limit\n- Results are returned using cat -n format, "
            "with line numbers starting at 1"),
         "input_schema": _schema({
             "file_path": {**s, "description": "The absolute path to the file to read"},
             "offset": {"type": "number", "description": "The line number to start reading from"},
             "limit": {"type": "number", "description": "The number of lines to read"}}, ["file_path"])},
        {"name": "Edit", "description": (
            "Performs exact string replacements in files.\n\nUsage:\n- You must use your `Read` tool at "
            "least once in the conversation before editing.\n- When editing text from Read tool output, "
            "ensure you preserve the exact indentation (tabs/spaces) as it appears AFTER the line "
            "number prefix.\n- The edit will FAIL if `old_string` is not unique in the file."),
         "input_schema": _schema({
             "file_path": {**s, "description": "The absolute path to the file to modify"},
             "old_string": {**s, "description": "The text to replace"},
             "new_string": {**s, "description": "The text to replace it with (must be different "
                                                "from old_string)"},
             "replace_all": {"type": "boolean", "default": False,
                             "description": "Replace all occurences of old_string (default false)"}},
             ["file_path", "old_string", "new_string"])},
        {"name": "Write", "description": (
            "Writes a file to the local filesystem.\n\nUsage:\n- This tool will overwrite the existing "
            "file if there is one at the provided path.\n- ALWAYS prefer editing existing files in the "
            "codebase. NEVER write new files unless explicitly required."),
         "input_schema": _schema({
             "file_path": {**s, "description": "The absolute path to the file to write"},
             "content": {**s, "description": "The content to write to the file"}},
             ["file_path", "content"])},
        {"name": "TodoWrite", "description": (
            "Use this tool to create and manage a structured task list for your current coding "
            "session. This helps you track progress, organize complex tasks, and demonstrate "
            "thoroughness to the user."),
         "input_schema": _schema({
             "todos": {"type": "array", "description": "The updated todo list", "items": {
                 "type": "object", "additionalProperties": False,
                 "required": ["content", "status", "activeForm"],
                 "properties": {
                     "content": {"type": "string", "minLength": 1},
                     "status": {"type": "string", "enum": ["pending", "in_progress", "completed"]},
                     "activeForm": {"type": "string", "minLength": 1}}}}}, ["todos"])},
        {"name": "WebFetch", "description": (
            "- Fetches content from a specified URL and processes it using an AI model\n- Takes a URL "
            "and a prompt as input\n- Fetches the URL content, converts HTML to markdown"),
         "input_schema": _schema({
             "url": {"type": "string", "format": "uri", "description": "The URL to fetch content from"},
             "prompt": {**s, "description": "The prompt to run on the fetched content"}},
             ["url", "prompt"])},
    ]


_SYSTEM_RULES = (
    "You are an interactive CLI tool that helps users with software engineering tasks. Use the "
    "instructions below and the tools available to you to assist the user.\n\n# Tone and style\n"
    "You should be concise, direct, and to the point. Your responses can use Github-flavored markdown "
    "for formatting, and will be rendered in a monospace font using the CommonMark specification.\n\n"
    "# Following conventions\nWhen making changes to files, first understand the file's code "
    "conventions. Mimic code style, use existing libraries and utilities, and follow existing "
    "patterns.\n- NEVER assume that a given library is available, even if it is well known.\n\n"
    "# Task Management\nYou have access to the TodoWrite tools to help you manage and plan tasks. "
    "Use these tools VERY frequently to ensure that you are tracking your tasks.\n\n"
    "# Doing tasks\nThe user will primarily request you perform software engineering tasks. This "
    "includes solving bugs, adding new functionality, refactoring code, explaining code, and more.\n"
    "- Use the available search tools to understand the codebase and the user's query.\n- Implement "
    "the solution using all tools available to you\n- Verify the solution if possible with tests.\n\n"
    "<env>\nWorking directory: /home/dev/project\nIs directory a git repo: Yes\nPlatform: linux\n"
    "OS Version: Linux 6.8.0-45-generic\nToday's date: 2025-10-08\n</env>\n"
)


def _file_listing(lines):
    body = []
    for i in range(1, lines + 1):
        body.append(f"{i:6d}\u2192    result = compute_value(item_{i}, weight={i % 7}, scale=1.5)  # step {i}")
    return "\n".join(body)


def build_body(stream: bool, target: int = BODY_TARGET_BYTES) -> bytes:
    """The request body, padded to ``target`` bytes (compact JSON, as the SDK sends it)."""
    listing_lines = 40

    def make(pad: str) -> bytes:
        document = {
            "model": MODEL,
            "max_tokens": 32000,
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "<system-reminder>\nAs you answer the user's questions, "
                                             "you can use the following context: the project uses "
                                             "Python 3.11 and Twisted.\n</system-reminder>"},
                    {"type": "text", "text": "The benchmark job is flaky; find out why compute_value "
                                             "is slow and fix it."}]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "I'll start by reading the module that defines compute_value."},
                    {"type": "tool_use", "id": "toolu_01A9q3Xk8sV2bT6mLw4rN7pY", "name": "Read",
                     "input": {"file_path": "/home/dev/project/src/engine/values.py"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01A9q3Xk8sV2bT6mLw4rN7pY",
                     "content": _file_listing(listing_lines) + pad}]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "The loop recomputes the weight table on every call. "
                                             "Let me search for other callers."},
                    {"type": "tool_use", "id": "toolu_01Bx7Hn2cQ5eR8kJv3uZ1wTd", "name": "Grep",
                     "input": {"pattern": "compute_value\\(", "path": "/home/dev/project/src",
                               "output_mode": "content", "-n": True}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01Bx7Hn2cQ5eR8kJv3uZ1wTd",
                     "content": "src/engine/values.py:12: def compute_value(item, weight, scale):\n"
                                "src/engine/batch.py:88:     out.append(compute_value(x, w, s))\n"
                                "tests/test_values.py:20:     assert compute_value(1, 2, 3) == 6"},
                    {"type": "text", "text": "Go ahead and cache the table.",
                     "cache_control": {"type": "ephemeral"}}]},
            ],
            "system": [
                {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
                 "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": _SYSTEM_RULES, "cache_control": {"type": "ephemeral"}},
            ],
            "tools": _tools(),
            "metadata": {"user_id": "user_3f1e0c9a7b5d4e2f8a6c1b0d9e7f5a3c2b1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f"
                                    "_account__session_6b1f3c2e-9d4a-4c8b-a1e2-7f5d3c9b8a10"},
            "temperature": 1,
        }
        if stream:
            document["stream"] = True
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    base = make("")
    missing = max(0, target - len(base))
    filler = ("\n" + "# padding: the rest of values.py is unchanged helper code " * 200)[:missing]
    body = make(filler)
    # json escapes "\n" as two bytes: trim the filler until the body fits the target exactly or just under
    while len(body) > target and filler:
        filler = filler[: len(filler) - (len(body) - target)]
        body = make(filler)
    return body


def header_lines(stream: bool = False):
    """``name: value`` lines; a streaming request also says which SDK helper made it."""
    lines = [f"{name}: {value}" for name, value in HEADERS]
    if stream:
        lines.append("x-stainless-helper-method: stream")
    return lines


def request_bytes(host: str, path: str, body: bytes, stream: bool) -> bytes:
    """A whole HTTP/1.1 request (headers then body) for raw-socket clients."""
    head = [f"POST {path} HTTP/1.1", f"host: {host}"] + header_lines(stream) + [
        f"content-length: {len(body)}", "", ""]
    return "\r\n".join(head).encode("latin-1") + body


def write_files(directory: str) -> dict:
    """Write the bodies and the header list for wrk; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = {"body": os.path.join(directory, "body.json"),
             "body_stream": os.path.join(directory, "body-stream.json"),
             "headers": os.path.join(directory, "headers.txt")}
    with open(paths["body"], "wb") as f:
        f.write(build_body(stream=False))
    with open(paths["body_stream"], "wb") as f:
        f.write(build_body(stream=True))
    with open(paths["headers"], "w", encoding="latin-1") as f:
        f.write("\n".join(header_lines(False)) + "\n")
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write("usage: payload.py DIR\n")
        sys.exit(2)
    for name, path in write_files(sys.argv[1]).items():
        print(f"{name}: {path} ({os.path.getsize(path)} bytes)")
