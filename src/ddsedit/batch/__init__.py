"""Batch edits: many rows of a manifest, one model load, resumable, spread over processes.

A manifest is JSONL (one JSON object a line) or CSV (a header line, then one row a line).
Each row names ``src``, ``query`` and optionally ``ref``, ``method``, ``mask``, ``seed``,
``steps``, ``guidance``, ``lr`` and ``out``; paths are relative to the manifest's folder,
absent columns take the command-line defaults.

The run goes:

1. :func:`ddsedit.manifest.load_manifest` reads and checks every row (files exist and are images, methods,
   prompts, numbers, output names) without torch; bad rows stop the run before anything
   loads, unless ``skip_invalid``: then the others run, the bad ones are recorded as
   ``invalid`` and the run still exits 1, since those rows were not done.
2. Each row becomes a :class:`~ddsedit.batch.plan.Job`: its output path and its full
   :class:`~ddsedit.editor.EditConfig`, with a seed that is the same on every run (so that
   resuming can compare parameters).
3. Rows are split between processes with accelerate's ``PartialState.split_between_processes``
   (one process unless started by ``accelerate launch``): the rows whose output is missing and
   the rows whose output exists (to check) are each split evenly, so a resumed run stays balanced.
4. A row whose output exists with the same recorded parameters is skipped: the same edit
   settings, the same resolved model and prediction type, the same source and mask bytes
   (SHA-256). The model is loaded once, only if some row is left; rows run alone or K at a
   time in one UNet call.
5. Every finished row is appended to ``results.jsonl`` (``results.<rank>.jsonl`` per process
   when there are several, merged by the main process), flushed and fsynced.

Outputs are written atomically, so a run killed at any moment leaves each output either
complete or absent, and the same command run again does only what is left.

The modules, one job each: :mod:`~ddsedit.batch.options` (what the command was given),
:mod:`~ddsedit.batch.plan` (jobs, groups, resume matching), :mod:`~ddsedit.batch.records`
(the results files), :mod:`~ddsedit.batch.display` (progress and summary),
:mod:`~ddsedit.batch.processes` (several processes) and :mod:`~ddsedit.batch.run` (the run itself).
"""

from __future__ import annotations

from ddsedit.batch.options import BatchOptions
from ddsedit.batch.run import run_batch

__all__ = ["BatchOptions", "run_batch"]
