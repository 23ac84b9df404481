"""Evaluate NeoBERT checkpoints: fine-tune and score on GLUE, or embed and score on MTEB.

    python evaluate.py glue [CONFIG] [--section.key value ...]     # CONFIG defaults to configs/glue.yaml
    python evaluate.py mteb [CONFIG] [--section.key value ...]     # CONFIG defaults to configs/mteb.yaml
    torchrun --nproc_per_node 8 evaluate.py glue|mteb [...]        # runs / tasks spread over the processes

A model may be a run directory, a model_checkpoints/<step> directory, an exported HF folder or a hub id.
Read top to bottom: GLUE (tasks, data, metrics, fine-tuning, sweep, report) -> MTEB (encoder, tasks, report) -> main.
"""

import sys

import data

# -----------------------------------------------------------------------------
# GLUE
# (section owned by the GLUE work; entry point: glue_main(argv) -> int)

# === GLUE SECTION END ===

# -----------------------------------------------------------------------------
# MTEB
# (section owned by the MTEB work; entry point: mteb_main(argv) -> int)

# === MTEB SECTION END ===

# -----------------------------------------------------------------------------
# main

USAGE = __doc__


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("glue", "mteb"):
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    return glue_main(rest) if command == "glue" else mteb_main(rest)


if __name__ == "__main__":
    sys.exit(main())
