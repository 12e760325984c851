"""Dataset-scale explanation: a resumable sweep over thousands of prompts, on one CPU or many GPUs.

    python -m explain sweep captions.txt --out sweep-out
    accelerate launch --num_processes 8 -m explain sweep captions.txt --out sweep-out --protocol paper

One module one job: `prompts` reads and validates prompt files; `plan` derives seeds, orders
prompts and shards them over accelerate's processes; `protocol` resolves the paper's or the
project's settings; `analyses` holds the per-prompt plug-ins; `runner` runs them; `manifest`
owns the output folder (atomic per-prompt records: resumable, never half-written); `aggregate`
turns records into tables and statistics; `report` writes the CSV/Parquet, JSON and HTML;
`shapes` is the ground-truth mode on the shapes world; `words` the word classes; `cli` the
``sweep`` subcommand.
"""
