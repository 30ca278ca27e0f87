"""Prints one line per benchmark of a pytest-benchmark JSON file: median ms and its extra_info."""
import json
import sys


def main(path):
    with open(path) as f:
        data = json.load(f)
    for bench in sorted(data["benchmarks"], key=lambda b: (b["group"] or "", b["name"])):
        stats = bench["stats"]
        extra = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in sorted(bench.get("extra_info", {}).items()))
        print(f"{bench['group'] or '-'} | {bench['name']} | median {stats['median'] * 1e3:.4f} ms"
              f" | min {stats['min'] * 1e3:.4f} ms | {extra}")


if __name__ == "__main__":
    main(sys.argv[1])
