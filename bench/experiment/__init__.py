"""The evidence experiment (issue 20): SmolLM2-135M-Instruct, made aligned, fine-tuned into a small fleet that
erodes its safety to different degrees, repaired by safemerge-ray, and evaluated on held-out prompts.

    python -m bench.experiment            # `make experiment`: the full run, docs/evidence.md
    python -m bench.experiment --smoke    # `make experiment-smoke`: every stage on a handful of prompts
"""
