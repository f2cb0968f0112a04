"""The `magicpig demo` at 96k tokens, for a long-context model on a machine with a GPU.

Needle in a haystack of --tokens tokens (default 96,000): exact prefill once, then decode with
dense attention and with MagicPIG (sinks + window on the GPU, the centred middle K/V and its
LSH tables in the CPU store). Prints both answers, the computation cost, decode tokens/s and
where the bytes live. Example (Llama-3.1-8B-Instruct already in the local HF cache):

    python scripts/demo_96k.py --model meta-llama/Llama-3.1-8B-Instruct --tokens 96000

The default embedded SmolLM2-135M has only 8k positions, so --model is required for 96k.
Dense decode at 96k needs the full KV on the device (about 12 GiB for Llama-3.1-8B in bf16);
MagicPIG needs it only for the dense layers.
"""

from __future__ import annotations

import sys

from magicpig.cli.demo import main as demo_main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--tokens" or a.startswith("--tokens=") for a in argv):
        argv += ["--tokens", "96000"]
    asks_help = any(a in ("-h", "--help") for a in argv)
    if not asks_help and not any(a == "--model" or a.startswith("--model=") for a in argv):
        print("demo_96k: pass --model (a local HF directory, .gguf file or cached hub id of a "
              "long-context Llama-family model, e.g. meta-llama/Llama-3.1-8B-Instruct)", file=sys.stderr)
        return 2
    return demo_main(argv)


if __name__ == "__main__":
    sys.exit(main())
