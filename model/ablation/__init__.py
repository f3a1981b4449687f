"""The ablation runner's parts, one job each. The entry point, with the protocol in words, is model/ablate.py
(`python -m model.ablate`), which re-exports every name below.

protocol.py  the arms, the studies, the metrics and comparisons, the protocol line of a results file
digest.py    the config digest that ties recorded runs to the resolved config
runner.py    one run's config and folder, training and evaluating it (under a run lock), the finished runs
decide.py    per-arm statistics over seeds and the decision rule
report.py    the results file, its table (.md) and bar plot (.png)
"""
