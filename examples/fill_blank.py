"""CPM-2 fills the blanks of a text: each <span> is one blank, filled in order.

    python examples/fill_blank.py [--text "...<span>..."] [--seed 0] [--version cpm2-demo]

Without --version it uses the released cpm2.1-new when it is cached or can be downloaded, and the
small demo checkpoint that ships with bminf otherwise (it says so in one line on stderr).
"""
import argparse
import sys

import bminf
from bminf.models.cpm2 import fill_in

TEXT = ("北京环球度假区相关负责人介绍，北京环球影城指定单日门票将采用<span>制度，即推出淡季日、平季日、"
        "旺季日和特定日门票。<span>价格为418元，<span>价格为528元，<span>价格为638元，<span>价格为"
        "748元。北京环球度假区将提供90天滚动价格日历，以方便游客提前规划行程。")


def show(text: str, blanks: list, tty: bool) -> str:
    """The text with each blank replaced, green on a terminal, in brackets elsewhere; blanks not
    filled yet show as ____."""
    return fill_in(text, blanks, (lambda t: f"\033[0;32m{t}\033[0m") if tty else (lambda t: f"[{t}]"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", default=TEXT, help="a text with <span> blanks")
    parser.add_argument("--version", help="cpm2.1-new, cpm2-demo, file://DIR or a directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu or cuda (default: the GPU if there is one)")
    parser.add_argument("--memory-limit", help="GPU memory budget, e.g. 6GiB")
    args = parser.parse_args()
    cpm2 = bminf.models.CPM2.available(args.version, device=args.device, memory_limit=args.memory_limit)
    tty = sys.stdout.isatty()
    print("Input: ", show(args.text, [], tty))
    blanks = cpm2.fill_blank(args.text, top_p=1.0, top_n=5, temperature=0.5, seed=args.seed)
    print("Output:", show(args.text, blanks, tty))


if __name__ == "__main__":
    main()
