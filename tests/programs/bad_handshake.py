"""Task programs that must stop an offload server at start, by how they fail their handshake:

- `garbage` (the default): its first line is not a protocol message;
- `protocol2`: a valid ready line for a protocol version this server does not speak;
- `taken`: declares `noop`, a task the built-in catalogue already has;
- `greedy`: says it takes a billion runs at once (concurrency past the server's bound);
- `cyclic`: declares a task whose args_schema is a `$ref` cycle (`{"$ref": "#"}`).
"""

import json
import sys
import time

mode = sys.argv[1] if len(sys.argv) > 1 else "garbage"
schema = {"type": "object"}
if mode == "garbage":
    print("hello, I am not a protocol message", flush=True)
elif mode == "protocol2":
    print(json.dumps({"ready": {"protocol": 2, "pid": 1, "concurrency": 1, "tasks": []}}),
          flush=True)
elif mode == "taken":
    task = {"name": "noop", "kind": "cpu", "version": "1", "description": "clash",
            "args_schema": schema, "blob_args": []}
    print(json.dumps({"ready": {"protocol": 1, "pid": 1, "concurrency": 1, "tasks": [task]}}),
          flush=True)
elif mode == "greedy":
    task = {"name": "greedy", "kind": "io", "version": "1", "description": "many",
            "args_schema": schema, "blob_args": []}
    print(json.dumps({"ready": {"protocol": 1, "pid": 1, "concurrency": 10**18,
                                "tasks": [task]}}), flush=True)
elif mode == "cyclic":
    task = {"name": "loop", "kind": "cpu", "version": "1", "description": "a cycle",
            "args_schema": {"$ref": "#"}, "blob_args": []}
    print(json.dumps({"ready": {"protocol": 1, "pid": 1, "concurrency": 1, "tasks": [task]}}),
          flush=True)
# Then wait to be killed (or for stdin to close).
sys.stdin.read()
time.sleep(0.1)
