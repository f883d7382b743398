"""Phase 2: from the run folder's rollouts to training shards and the report, calling no model.

- :mod:`~sft_ray.finalize.passes`: the passes (scan, group per prompt, sort, write shards)
- :mod:`~sft_ray.finalize.curate`: the row rules and the prompt rules (dedup, at most k per prompt)
- :mod:`~sft_ray.finalize.formats`: the training formats, the Parquet schema, the dataset card
- :mod:`~sft_ray.finalize.stats`: the statistics, the text report, rejection sampling's tally
- :mod:`~sft_ray.finalize.report_html`: the one-page HTML report
"""
