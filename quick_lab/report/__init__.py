"""The paper's figures and ``REPORT.md``, drawn from the measured CSVs of ``results/<gpu>/``.

- ``results``: finding results directories (``default_results_dir``, ``gpu_results_dir``, ``gpu_dirs``,
  ``find_gpu_dir``), loading their CSVs and metadata, and the tidy tables drawn from them (best times,
  speedups, tile and e2e tables, bank-conflict counts measured and modelled, cases shared across GPUs).
- ``style``: kernel order, labels and colours, the paper's claims (``PAPER``), matplotlib / seaborn
  setup and shared axis helpers.
- ``figures``: the plots, ``fig1_compute_paths`` .. ``fig5_tiles`` and ``fig_e2e_breakdown``; ``save`` (PNG +
  SVG) and ``draw_all``.
- ``text``: ``REPORT.md``, each figure beside the paper's claim and our numbers (``write_report``).
- ``comparison``: ``COMPARISON.md`` beside the GPU directories, every GPU present side by side
  (``write_comparison``; the tables it reads from ``results``, its figure from ``figures``).
- ``reproduce``: ``reproduce(results_dir)``, every figure and the report of one directory;
  ``reproduce_all()``, every GPU directory and the comparison (what ``quick-lab reproduce`` runs).

The command line lives in ``quick_lab.cli``. Importing this package imports none of its modules (and
so neither pandas nor matplotlib).
"""
