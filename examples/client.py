"""The README's Python client, runnable: one streamed generation, routed by adapter in a fleet.

    python examples/client.py --target 127.0.0.1:50051 --adapter support --prompt "Hello,"

`x-loraserve-adapter` makes a fleet's proxy (deploy/haproxy/haproxy.cfg) send every request for one
adapter to the replica that already holds it; a single server ignores the header.
"""
import argparse
import os

import grpc

from server.api.gen.loraserve.v1 import inference_pb2 as pb
from server.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=os.environ.get("LORASERVE_TARGET", "127.0.0.1:50051"))
    p.add_argument("--adapter", default="", help="adapter id (name or name@N); empty = the base model")
    p.add_argument("--prompt", default="Hello,")
    p.add_argument("--api-key", default=os.environ.get("LORASERVE_API_KEY", ""))
    args = p.parse_args()
    md = []
    if args.adapter:
        md.append(("x-loraserve-adapter", args.adapter.split("@", 1)[0]))  # the name, without the version
    if args.api_key:
        md.append(("authorization", f"Bearer {args.api_key}"))
    with grpc.insecure_channel(args.target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        req = pb.GenerateRequest(adapter_id=args.adapter, prompt=args.prompt,
                                 params=pb.SamplingParams(max_new_tokens=32, temperature=0))
        chunk = None
        for chunk in stub.GenerateStream(req, metadata=md, timeout=60):
            print(chunk.text, end="", flush=True)
        if chunk is not None:
            print("\n", chunk.usage, chunk.adapter_id, chunk.adapter_version)


if __name__ == "__main__":
    main()
