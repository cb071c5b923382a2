"""Results generated from files, never typed by hand: docs/results.md and the README's headline tables
(`safetyneurons report`), and the provenance every run and benchmark records (code version, machine).

Modules: ``machine`` (code version, CPU / threads / GPU), ``sources`` (run directories and benchmark JSON, read and
checked), ``tables`` (markdown tables with fixed number formats), ``generate`` (results.md, README blocks, check).
"""
