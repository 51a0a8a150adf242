"""CPM-1 continues a text, printed as it is generated.

    python examples/generate_cpm1.py [--prompt "..."] [--max-tokens 64] [--seed 0] [--version cpm1-demo]

Without --version it uses the released cpm1-new when it is cached or can be downloaded, and the
small demo checkpoint that ships with bminf otherwise (it says so in one line on stderr).
"""
import argparse

import bminf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", default="天空是蔚蓝色，窗外有")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--version", help="cpm1-new, cpm1-demo, file://DIR or a directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu or cuda (default: the GPU if there is one)")
    parser.add_argument("--memory-limit", help="GPU memory budget, e.g. 6GiB")
    args = parser.parse_args()
    cpm1 = bminf.models.CPM1.available(args.version, device=args.device, memory_limit=args.memory_limit)
    print(args.prompt, end="", flush=True)
    for piece in cpm1.generate(args.prompt, max_tokens=args.max_tokens, top_n=5, temperature=0.85,
                               presence_penalty=1, seed=args.seed, stream=True):
        print(piece, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
