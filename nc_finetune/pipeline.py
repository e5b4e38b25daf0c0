"""Recipe-level stages: each reads a validated recipe, composes the stage modules and writes into a run directory.

``run_probe_stage`` (``nc-finetune probe``), ``probe_and_select`` (``select``), ``run_pipeline`` (``run``: probe ->
choose blocks -> adapt -> train), ``eval_stage`` (``eval``) and ``rank_stage`` (``rank``). The work itself lives in
the stage packages; the rules of a run directory in :mod:`nc_finetune.runs`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from nc_finetune import runs
from nc_finetune.adapt.recipe import build_recipe_classifier
from nc_finetune.config import Recipe, recipe_to_dict
from nc_finetune.data.prepare import PreparedData, load_recipe_data, prepare_data  # also imported from here
from nc_finetune.runs import RunDir
from nc_finetune.utils.dist import is_main_process
from nc_finetune.utils.env import check_recipe_devices


def load_recipe_backbone(recipe: Recipe):
    """Build the backbone named by ``recipe.backbone`` (with the weights of ``backbone.init_from`` when set, cut
    after ``backbone.truncate_at`` when set)."""
    from nc_finetune.backbones import load_backbone
    from nc_finetune.restore import restore_backbone_weights

    b = recipe.backbone
    backbone = load_backbone(b.name, pooling=b.pooling, image_size=b.image_size, max_length=b.max_length,
                             pretrained=b.pretrained)
    if b.init_from:
        restored = restore_backbone_weights(backbone, Path(b.init_from), name=b.name, pretrained=b.pretrained)
        backbone.provenance = {**backbone.provenance, "init_from": restored["run"],
                               "init_from_method": restored["method"], "init_from_params": str(restored["params"])}
    if b.truncate_at is not None:
        from nc_finetune.backbones.truncate import truncate_backbone

        backbone = truncate_backbone(backbone, b.truncate_at)
    return backbone


def run_probe_stage(recipe: Recipe, out: Path | None, *, overwrite: bool = False, progress: bool = True,
                    prepared: PreparedData | None = None, backbone=None):
    """Probe every block of the recipe's backbone on its training data; write ``probe.json`` and ``probe.png``.

    Args:
        recipe: Validated recipe.
        out: Run directory (``None``: write nothing).
        overwrite: Allow replacing existing artefacts.
        progress: tqdm progress bars.
        prepared: Data already loaded by the caller (``run`` reuses it for training).
        backbone: A backbone already built by the caller.

    Returns:
        The :class:`~nc_finetune.probe.result.ProbeResult`.
    """
    from nc_finetune.probe.runner import probe

    check_recipe_devices(recipe)
    if out is not None:
        RunDir(out).check_writable([runs.PROBE, runs.PROBE_PLOT, runs.RESOLVED], overwrite, recipe)
    prepared = prepared or prepare_data(recipe)
    backbone = backbone or load_recipe_backbone(recipe)
    data = prepared.data
    p = recipe.probe
    meta = {"dataset": data.name, "class_names": list(data.class_names), "samples_per_class": p.samples_per_class,
            "data_info": data.info, "recipe": recipe_to_dict(recipe)}
    result = probe(backbone, prepared.probe_split, data.num_classes, cfg=p, progress=progress, meta=meta)
    if out is not None and is_main_process():  # several processes: rank 0 writes
        run = RunDir(out)
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_recipe(recipe)
        _write_probe(result, run.path)
    return result


def reference_source_data(recipe: Recipe):
    """The data section of the ``backbone.init_from`` run when ``selection.reference=source`` asks for it, else
    ``None`` (selection reads no run directories: the data reaches it as an argument).

    Raises:
        UserError: ``backbone.init_from`` is not a finished run.
    """
    s = recipe.selection
    if s.strategy != "shift" or s.reference != "source" or not recipe.backbone.init_from:
        return None
    return RunDir(recipe.backbone.init_from).read_finished_recipe("selection.reference=source").data


def check_selection_feasible(recipe: Recipe, backbone, num_classes: int) -> None:
    """Fail on an unknown manual block or a budget that no block fits before the probe is paid for.

    Neither depends on the ranking, so a rank-free strategy with the same budget raises the same error that the
    real selection would raise after probing (and the run directory is not left holding a probe).

    Raises:
        ConfigError: as :func:`~nc_finetune.select.select_blocks`.
    """
    from nc_finetune.adapt.recipe import head_param_count
    from nc_finetune.rivals import check_rival_options
    from nc_finetune.select import select_blocks
    from nc_finetune.select.hooks import check_selection_inputs

    check_rival_options(recipe, backbone.feature_dim, num_classes)
    s = recipe.selection
    check_selection_inputs(recipe, reference_source_data(recipe))
    if s.strategy == "all":  # budgets do not apply
        return
    head = head_param_count(backbone.feature_dim, num_classes, recipe.adapt.head)
    # Rank-free strategies are checked as they will run; for the others only that some block fits can be known.
    free = s.strategy in ("manual", "last_k", "first_k", "random_k")
    select_blocks(None, backbone.blocks, strategy=s.strategy if free else "last_k",
                  max_blocks=s.max_blocks, max_param_fraction=s.max_param_fraction, manual=s.blocks, seed=s.seed,
                  head_params=head, total_params=backbone.num_params() + head, fill=s.fill if free else "skip")


#: Selection keys that only cut a ranking: the computed inputs (trials, gradients, probes) do not depend on them.
_BUDGET_KEYS = ("max_blocks", "max_param_fraction", "fill", "blocks")


def choose_blocks(recipe: Recipe, backbone, probe_result, prepared: PreparedData, num_classes: int,
                  inputs_cache: dict | None = None):
    """The blocks ``recipe.selection`` picks on a probed backbone (computing the strategy's own inputs first).

    Args:
        inputs_cache: Computed inputs kept by everything but the budget (``sweep``: one per seed, so ``trial``
            trains its blocks once for all budgets).

    Returns:
        The :class:`~nc_finetune.select.Selection`.
    """
    import json

    from nc_finetune.adapt.recipe import head_param_count
    from nc_finetune.rivals import selection_inputs as rival_inputs
    from nc_finetune.select import select_blocks
    from nc_finetune.select.hooks import selection_inputs

    head = head_param_count(backbone.feature_dim, num_classes, recipe.adapt.head)
    as_dict = recipe_to_dict(recipe)
    as_dict["selection"] = {k: v for k, v in as_dict["selection"].items() if k not in _BUDGET_KEYS}
    key = json.dumps(as_dict, sort_keys=True, default=str)
    extra = None if inputs_cache is None else inputs_cache.get(key)
    if extra is None:
        extra = {**selection_inputs(recipe, backbone, prepared, num_classes,
                                    source_data=reference_source_data(recipe)),
                 **rival_inputs(recipe, backbone, prepared)}
        if inputs_cache is not None:
            inputs_cache[key] = extra
    return select_blocks(probe_result, backbone.blocks, cfg=recipe.selection, head_params=head,
                         total_params=backbone.num_params() + head, **extra)


def run_pipeline(recipe: Recipe, out: Path, *, resume: bool = False, progress: bool = True,
                 stop_after_steps: int | None = None, prepared: PreparedData | None = None,
                 probe_result=None, selection=None, cache_store: dict | None = None) -> dict:
    """The whole pipeline: probe -> select -> adapt -> train -> report, artefacts in ``out``.

    Args:
        recipe: Validated recipe.
        out: Run directory.
        resume: Continue a killed run from ``out/checkpoint`` (same recipe required).
        progress: tqdm bars.
        stop_after_steps: Test hook (simulated kill after this many steps).
        prepared: Data already loaded with this recipe's data and probe sections (``sweep`` shares it by seed).
        probe_result: A probe of this recipe's backbone on ``prepared`` (skips the probe; saved as ``probe.json``).
        selection: The blocks to train (skips the select stage; saved as ``selection.json``).
        cache_store: Frozen-prefix caches to reuse and fill, keyed by the first trainable block; valid only across
            runs that share the data split and the frozen weights (``sweep``: one store per candidate and seed).

    Returns:
        The summary written to ``summary.json``.
    """
    from nc_finetune.data.streaming import check_stream_training
    from nc_finetune.train.tracking import check_trackers
    from nc_finetune.utils.env import seed_everything

    run = RunDir(out)
    check_recipe_devices(recipe)
    if resume:
        run.check_resume(recipe)
    else:
        run.check_new_run()
    check_trackers(recipe.train.report_to)
    check_stream_training(recipe)
    prepared = prepared or prepare_data(recipe)  # validates the data before any model is built
    K = prepared.data.num_classes
    seed_everything(recipe.train.seed)
    backbone = load_recipe_backbone(recipe)
    resumed_selection = resume and run.has(runs.SELECTION)
    if not resumed_selection and selection is None:
        check_selection_feasible(recipe, backbone, K)
    main = is_main_process()  # several processes: rank 0 writes
    if main:
        run.path.mkdir(parents=True, exist_ok=True)
    # Nothing trained yet: a failure leaves the directory as it was, so a corrected rerun is accepted.
    with run.removed_on_error([] if resume or not main else
                              [runs.RESOLVED, runs.PROBE, runs.PROBE_PLOT, runs.SELECTION]):
        if main:
            run.write_recipe(recipe)
        if resume and run.has(runs.PROBE):
            probe_result = run.read_probe()
        elif probe_result is not None:
            if main:
                probe_result.save(run / runs.PROBE)
        else:
            probe_result = run_probe_stage(recipe, run.path, overwrite=True, progress=progress, prepared=prepared,
                                           backbone=backbone)
        if resumed_selection:
            selection = run.read_selection()
        else:
            if selection is None:
                selection = choose_blocks(recipe, backbone, probe_result, prepared, K)
            if main:
                selection.save(run / runs.SELECTION)
        adapted = build_recipe_classifier(recipe, backbone, K, selection, probe_result, prepared.data.train)
    return _train(recipe, run, prepared.data, backbone, adapted, selection, resume=resume, progress=progress,
                  stop_after_steps=stop_after_steps, cache_store=cache_store)


def _train(recipe: Recipe, run: RunDir, data, backbone, adapted, selection, *, resume: bool, progress: bool,
           stop_after_steps: int | None, cache_store: dict | None) -> dict:
    """Train ``adapted``, save its final weights and write ``summary.json`` (the last part of :func:`run_pipeline`)."""
    from nc_finetune.data import StreamSplit, stratified_split
    from nc_finetune.train.checkpoint import has_checkpoint
    from nc_finetune.train.loop import TrainData, Trainer
    from nc_finetune.utils.env import library_versions
    from nc_finetune.utils.io import write_json_atomic

    t = recipe.train
    train_split, val_split = data.train, None
    if t.val_fraction > 0 and isinstance(data.train, StreamSplit):  # carved per row, as the test split
        train_split, val_split = data.train.split_off(t.val_fraction, t.seed)
    elif t.val_fraction > 0:
        tr_idx, val_idx = stratified_split(np.asarray(data.train.labels), t.val_fraction, t.seed)
        train_split, val_split = data.train.subset(tr_idx), data.train.subset(val_idx)
    trainer = Trainer(adapted, backbone, TrainData(train=train_split, test=data.test, val=val_split), t, run.path,
                      progress=progress, stop_after_steps=stop_after_steps, cache_store=cache_store)
    # A run killed before its first checkpoint has nothing to continue from: it trains from the start.
    summary = trainer.fit(resume=resume and has_checkpoint(run / runs.CHECKPOINT))
    if trainer.rank == 0:
        run.save_final_weights(adapted)
    summary.update({
        "method": recipe.adapt.method,
        "backbone": recipe.backbone.name,
        "backbone_provenance": backbone.provenance,
        "dataset": data.name,
        "class_names": list(data.class_names),  # head output k is class_names[k] (nc_finetune.labels)
        "train_samples": len(train_split),
        "selection": selection.to_dict(),
        "recipe": recipe_to_dict(recipe),
        "versions": library_versions(),
    })
    if trainer.rank == 0:
        write_json_atomic(run / runs.SUMMARY, summary)
    return summary


def probe_and_select(recipe: Recipe, out: Path, *, overwrite: bool = False, progress: bool = True):
    """``nc-finetune select``: probe (or reuse ``out/probe.json`` made with the same recipe) and choose blocks; write
    ``selection.json``."""
    run = RunDir(out)
    check_recipe_devices(recipe)
    run.check_writable([runs.SELECTION], overwrite, recipe)
    prepared = prepare_data(recipe)
    backbone = load_recipe_backbone(recipe)
    check_selection_feasible(recipe, backbone, prepared.data.num_classes)
    probe_result = run.read_probe() if run.has(runs.PROBE) else None
    if probe_result is None or probe_result.meta.get("recipe", {}).get("probe") != recipe_to_dict(recipe)["probe"]:
        probe_result = run_probe_stage(recipe, run.path, overwrite=True, progress=progress, prepared=prepared,
                                       backbone=backbone)
    selection = choose_blocks(recipe, backbone, probe_result, prepared, prepared.data.num_classes)
    if is_main_process():
        selection.save(run / runs.SELECTION)
    return selection


def eval_stage(run_dir: Path, split: str = "test", batch_size: int | None = None,
               data_overrides: list[str] | None = None) -> dict:
    """Rebuild a finished run from its artefacts and score one split.

    Args:
        run_dir: Directory of a finished ``nc-finetune run``.
        split: ``test`` or ``train``.
        batch_size: Evaluation batch size (default: the recipe's ``train.eval_batch_size``).
        data_overrides: ``data.key=value`` changes of the run's data section, to score the model on other data with
            the same classes (e.g. ``data.corruption=gaussian_noise``); the other sections describe the model.

    Returns:
        ``{"accuracy", "loss", "samples", "split"}``.
    """
    from nc_finetune.evaluate import (
        check_eval_options,
        eval_recipe,
        load_trained_weights,
        score_split,
        trained_classes_of,
    )
    from nc_finetune.utils.env import seed_everything

    run = RunDir(run_dir)
    run.require_finished_run("eval")
    check_eval_options(split, batch_size, data_overrides)
    recipe = eval_recipe(run, data_overrides, batch_size)
    # Every artefact is read (and a damaged one refused) before any data or model loads.
    probe_result, selection, weights = run.read_probe(), run.read_selection(), run.read_final_weights()
    if recipe.data.streaming and split == "test":  # nothing reads the train stream: no per-class sample of it
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, max_train_samples=None))
    data = trained_classes_of(run, probe_result, load_recipe_data(recipe))  # head outputs are the run's classes
    seed_everything(recipe.train.seed)  # as run_pipeline: a randomly initialised backbone is drawn right after seeding
    backbone = load_recipe_backbone(recipe)
    adapted = build_recipe_classifier(recipe, backbone, data.num_classes, selection, probe_result, data.train)
    load_trained_weights(adapted, weights, run.path)
    return score_split(recipe, backbone, adapted, data, split, run.path)


def rank_stage(recipe: Recipe, out: Path, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Rank ``recipe.rank.candidates`` (and each one's layers) by collapse and transferability scores.

    Every candidate is probed once on the same probe subset with the transfer scorers on, so NC1, trace ratio,
    CDNV, LogME and H-score come from one streaming pass (NCTI from the per-layer reservoir); the parameter count is
    the static size baseline. Ground truth is the test accuracy of a training run per candidate
    (``rank.finetune``) or the probe's held-out linear-probe accuracy. Writes ``rank.json``, ``rank.png`` and
    ``candidates/<label>/`` (probe.json/png, and run/ when fine-tuning).

    Returns:
        The content of ``rank.json``.
    """
    import dataclasses

    from nc_finetune.transfer.ranking import (
        candidate_layers,
        candidate_row,
        check_rank_recipe,
        plot_rank,
        probe_candidate,
        rank_report,
        truth_key,
    )
    from nc_finetune.utils.env import seed_everything
    from nc_finetune.utils.io import write_json_atomic

    out = Path(out)
    check_recipe_devices(recipe)
    RunDir(out).check_writable([runs.RANK, runs.RANK_PLOT], overwrite)
    check_rank_recipe(recipe)
    prepared = prepare_data(recipe)
    data = prepared.data
    rows, layers = [], {}
    for cand in recipe.rank.candidates:
        cand_recipe = dataclasses.replace(recipe, backbone=cand.backbone())
        cand_dir = out / "candidates" / cand.folder
        seed_everything(recipe.probe.seed)
        backbone = load_recipe_backbone(cand_recipe)
        result = probe_candidate(backbone, prepared.probe_split, data.num_classes, recipe.probe, dataset=data.name,
                                 title=cand.title, progress=progress)
        _write_probe(result, cand_dir)
        row = candidate_row(cand, backbone.num_params(), result)
        if recipe.rank.finetune:
            row["finetune_accuracy"] = run_pipeline(cand_recipe, cand_dir / "run", progress=progress)["test_accuracy"]
        rows.append(row)
        layers[cand.title] = candidate_layers(result, recipe.probe.linear_probe)
    truth = truth_key(recipe)
    report = rank_report(rows, layers, truth, dataset=data.name, num_classes=data.num_classes,
                         probe_samples=len(prepared.probe_split), recipe=recipe_to_dict(recipe))
    if is_main_process():
        write_json_atomic(out / runs.RANK, report)
        plot_rank(rows, truth, out / runs.RANK_PLOT, title=f"{len(rows)} backbones on {data.name}: scores vs {truth}")
    return report


def _write_probe(result, directory: Path) -> None:
    """``probe.json`` and ``probe.png`` of ``result`` in ``directory`` (rank 0 writes)."""
    from nc_finetune.report.plots import plot_probe

    directory.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        result.save(directory / runs.PROBE)
        plot_probe(result, directory / runs.PROBE_PLOT)
