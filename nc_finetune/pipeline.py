"""Recipe-level stages: each reads a validated recipe, does one stage and writes its artefact to the run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nc_finetune.config import Recipe, dump_recipe, load_recipe, recipe_to_dict
from nc_finetune.errors import ConfigError, DataError, UserError
from nc_finetune.utils.io import write_text_atomic


@dataclass
class PreparedData:
    """The loaded dataset plus the stratified probe subset of its training split."""

    data: object  # nc_finetune.data.ClassificationData
    probe_split: object  # nc_finetune.data.Split


def check_out_dir(out: Path, artefacts: list[str], overwrite: bool) -> None:
    """Refuse to clobber existing artefacts unless asked to.

    Raises:
        UserError: an artefact already exists and ``overwrite`` is false.
    """
    existing = [name for name in artefacts if (out / name).exists()]
    if existing and not overwrite:
        raise UserError(f"{out} already holds {', '.join(existing)}; choose another --out or pass --overwrite")


def prepare_data(recipe: Recipe) -> PreparedData:
    """Load and validate the dataset, then draw the probe subset (all before any model compute).

    Raises:
        DataError: unusable data (see :func:`nc_finetune.data.validate_split`) or a class count that disagrees
            with ``data.num_classes``.
    """
    from nc_finetune.data import load_data, subsample_per_class, validate_split

    d = recipe.data
    data = load_data(d.name, train_split=d.train_split, test_split=d.test_split, text_column=d.text_column,
                     image_column=d.image_column, label_column=d.label_column, data_files=d.data_files,
                     max_train_samples=d.max_train_samples, max_eval_samples=d.max_eval_samples, seed=d.seed,
                     test_size=d.test_size, corruption=d.corruption, corruption_severity=d.corruption_severity)
    if d.num_classes is not None and d.num_classes != data.num_classes:
        raise DataError(f"data.num_classes is {d.num_classes} but '{d.name}' has {data.num_classes} classes "
                        f"({', '.join(map(str, data.class_names[:10]))}{' ...' if data.num_classes > 10 else ''})")
    validate_split(data.train, data.num_classes, f"data '{d.name}' split '{d.train_split}'")
    idx = subsample_per_class(np.asarray(data.train.labels), recipe.probe.samples_per_class, recipe.probe.seed)
    probe_split = data.train.subset(idx)
    validate_split(probe_split, data.num_classes, f"probe subset of '{d.name}' (probe.samples_per_class)")
    return PreparedData(data=data, probe_split=probe_split)


def load_recipe_backbone(recipe: Recipe):
    """Build the backbone named by ``recipe.backbone`` (with the weights of ``backbone.init_from`` when set, cut
    after ``backbone.truncate_at`` when set)."""
    from nc_finetune.adapt.restore import restore_backbone_weights
    from nc_finetune.backbones import load_backbone

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
    from nc_finetune.report.plots import plot_probe

    if out is not None:
        check_out_dir(out, ["probe.json", "probe.png"], overwrite)
    prepared = prepared or prepare_data(recipe)
    backbone = backbone or load_recipe_backbone(recipe)
    data = prepared.data
    p = recipe.probe
    meta = {"dataset": data.name, "class_names": list(data.class_names), "samples_per_class": p.samples_per_class,
            "data_info": data.info, "recipe": recipe_to_dict(recipe)}
    result = probe(backbone, prepared.probe_split, data.num_classes, batch_size=p.batch_size, layers=p.layers,
                   ncc_samples=p.ncc_samples, linear_probe=p.linear_probe, autocast=p.autocast, device=p.device,
                   seed=p.seed, progress=progress, meta=meta)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "resolved.yaml", dump_recipe(recipe))
        result.save(out / "probe.json")
        plot_probe(result, out / "probe.png")
    return result


RUN_ARTEFACTS = ["summary.json", "checkpoint", "metrics.jsonl", "selection.json", "probe.json"]


def check_resume_matches(out: Path, recipe: Recipe) -> None:
    """A ``--resume`` must continue the same recipe: compare with the run's ``resolved.yaml``.

    Raises:
        UserError: no run there, or the recipes differ (names the first differing key).
    """
    import yaml

    path = out / "resolved.yaml"
    if not path.is_file():
        raise UserError(f"--resume: {out} holds no run (no resolved.yaml)")
    before = yaml.safe_load(path.read_text(encoding="utf-8"))
    now = recipe_to_dict(recipe)
    diff = _first_difference(before, now)
    if diff is not None:
        raise UserError(f"--resume: {out} was started with a different recipe ({diff}); "
                        f"resume with the same recipe and overrides, or use another --out")


def _first_difference(a: object, b: object, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            d = _first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
            if d is not None:
                return d
        return None
    return None if a == b else f"{prefix}: {a!r} then, {b!r} now"


def check_selection_feasible(recipe: Recipe, backbone, num_classes: int) -> None:
    """Fail on an unknown manual block or a budget that no block fits before the probe is paid for.

    Neither depends on the ranking, so a rank-free strategy with the same budget raises the same error that the
    real selection would raise after probing (and the run directory is not left holding a probe).

    Raises:
        ConfigError: as :func:`~nc_finetune.select.select_blocks`.
    """
    from nc_finetune.select import select_blocks

    s = recipe.selection
    if s.strategy == "all":  # budgets do not apply
        return
    head = backbone.feature_dim * num_classes + num_classes
    select_blocks(None, backbone.blocks, strategy="manual" if s.strategy == "manual" else "last_k",
                  max_blocks=s.max_blocks, max_param_fraction=s.max_param_fraction, manual=s.blocks,
                  head_params=head, total_params=backbone.num_params() + head)


def run_select_stage(recipe: Recipe, backbone, probe_result, prepared: PreparedData, num_classes: int):
    """Choose blocks per ``recipe.selection``; Auto-RGN measures gradients on a temporary full classifier."""
    from nc_finetune.adapt import build_classifier
    from nc_finetune.select import auto_rgn_scores, select_blocks
    from nc_finetune.utils.env import resolve_device, seed_everything

    s = recipe.selection
    head = backbone.feature_dim * num_classes + num_classes
    rgn = None
    if s.strategy == "auto_rgn":
        seed_everything(recipe.train.seed)
        tmp = build_classifier(backbone, num_classes, method="full")
        tmp.model.to(resolve_device(recipe.train.device))  # the new head is built on the CPU
        split = prepared.data.train
        rng = np.random.default_rng(recipe.selection.seed)
        bs = 64  # as in the surgical fine-tuning code
        batches = []
        for _ in range(s.rgn_batches):
            idx = rng.choice(len(split), size=min(bs, len(split)), replace=False)
            batches.append((backbone.prepare(split.subset(idx).inputs),
                            _labels_tensor(np.asarray(split.labels)[idx])))
        rgn = auto_rgn_scores(tmp.model, backbone.blocks, batches, num_batches=s.rgn_batches)
        tmp.model.requires_grad_(True).to("cpu")  # loaders hand out CPU models; the trainer moves it
        del tmp
    return select_blocks(probe_result, backbone.blocks, strategy=s.strategy, max_blocks=s.max_blocks,
                         max_param_fraction=s.max_param_fraction, manual=s.blocks, seed=s.seed, head_params=head,
                         total_params=backbone.num_params() + head, rgn_scores=rgn, stall_fraction=s.stall_fraction)


def _labels_tensor(labels: np.ndarray):
    import torch

    return torch.as_tensor(labels, dtype=torch.long, device="cpu")  # batches stay on the CPU until scored


def run_stage(recipe: Recipe, out: Path, *, resume: bool = False, progress: bool = True,
              stop_after_steps: int | None = None) -> dict:
    """The whole pipeline: probe -> select -> adapt -> train -> report, artefacts in ``out``.

    Args:
        recipe: Validated recipe.
        out: Run directory.
        resume: Continue a killed run from ``out/checkpoint`` (same recipe required).
        progress: tqdm bars.
        stop_after_steps: Test hook (simulated kill after this many steps).

    Returns:
        The summary written to ``summary.json``.
    """
    from nc_finetune.data import stratified_split
    from nc_finetune.probe.result import ProbeResult
    from nc_finetune.select import Selection
    from nc_finetune.train.checkpoint import has_checkpoint
    from nc_finetune.train.loop import TrainData, Trainer
    from nc_finetune.utils.env import library_versions, seed_everything
    from nc_finetune.utils.io import write_json_atomic

    out = Path(out)
    if resume:
        check_resume_matches(out, recipe)
    else:
        existing = [n for n in RUN_ARTEFACTS if (out / n).exists()]
        if existing:
            raise UserError(f"{out} already holds a run ({', '.join(existing)}); continue it with --resume "
                            f"or choose another --out")
    prepared = prepare_data(recipe)  # validates the data before any model is built
    data = prepared.data
    K = data.num_classes
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "resolved.yaml", dump_recipe(recipe))

    seed_everything(recipe.train.seed)
    backbone = load_recipe_backbone(recipe)
    if not (resume and (out / "selection.json").exists()):
        check_selection_feasible(recipe, backbone, K)
    if resume and (out / "probe.json").exists():
        probe_result = ProbeResult.load(out / "probe.json")
    else:
        probe_result = run_probe_stage(recipe, out, overwrite=True, progress=progress, prepared=prepared,
                                       backbone=backbone)
    if resume and (out / "selection.json").exists():
        selection = Selection.load(out / "selection.json")
    else:
        selection = run_select_stage(recipe, backbone, probe_result, prepared, K)
        selection.save(out / "selection.json")

    adapted = build_recipe_classifier(recipe, backbone, K, selection, probe_result, data.train)
    t = recipe.train
    train_split, val_split = data.train, None
    if t.val_fraction > 0:
        tr_idx, val_idx = stratified_split(np.asarray(data.train.labels), t.val_fraction, t.seed)
        train_split, val_split = data.train.subset(tr_idx), data.train.subset(val_idx)
    trainer = Trainer(adapted, backbone, TrainData(train=train_split, test=data.test, val=val_split), t, out,
                      progress=progress, stop_after_steps=stop_after_steps)
    # A run killed before its first checkpoint has nothing to continue from: it trains from the start.
    summary = trainer.fit(resume=resume and has_checkpoint(out / "checkpoint"))
    if trainer.rank == 0:
        _save_final_weights(adapted, out)
    summary.update({
        "method": recipe.adapt.method,
        "backbone": recipe.backbone.name,
        "backbone_provenance": backbone.provenance,
        "dataset": data.name,
        "train_samples": len(train_split),
        "selection": selection.to_dict(),
        "recipe": recipe_to_dict(recipe),
        "versions": library_versions(),
    })
    if trainer.rank == 0:
        write_json_atomic(out / "summary.json", summary)
    return summary


def build_recipe_classifier(recipe: Recipe, backbone, num_classes: int, selection, probe_result, split):
    """The classifier of ``recipe.adapt`` on ``selection``, seeded with ``train.seed`` (shared by run and eval)."""
    from nc_finetune.adapt import build_classifier
    from nc_finetune.utils.env import seed_everything

    a = recipe.adapt
    skip_dim = scl_skip_dim(recipe, backbone, selection, probe_result, split)
    seed_everything(recipe.train.seed)  # the head / LoRA init must not depend on what ran before
    return build_classifier(backbone, num_classes, method=a.method, selection=selection, skip_dim=skip_dim,
                            wiring=a.scl_wiring, lora_r=a.lora_r, lora_alpha=a.lora_alpha,
                            lora_dropout=a.lora_dropout, freeze_bn=a.freeze_bn)


def scl_skip_dim(recipe: Recipe, backbone, selection, probe_result, split) -> int | None:
    """Pooled width of the SCL skip block (the deepest selected one): from the probe, or, when ``probe.layers`` left
    that block out, from one no-grad forward of a training sample. ``None`` for the other methods."""
    import torch

    names = [b["name"] for b in selection.blocks]
    if recipe.adapt.method != "scl" or not names:
        return None
    dims = {r["name"]: r["dim"] for r in probe_result.layers}
    if names[-1] in dims:
        return int(dims[names[-1]])
    device = next(backbone.model.parameters()).device
    inputs = {k: v.to(device) for k, v in backbone.prepare(split.subset([0]).inputs).items()}
    pooled: dict[str, int] = {}

    def capture(_module, _args, out) -> None:  # must return None: a returned value would replace the output
        pooled.setdefault("dim", int(backbone.pool(out, inputs).shape[1]))

    hook = backbone.model.get_submodule(names[-1]).register_forward_hook(capture)
    try:
        with torch.no_grad():
            backbone.model(**inputs)
    finally:
        hook.remove()
    return pooled["dim"]


def _save_final_weights(adapted, out: Path) -> None:
    """peft adapter format for LoRA (loads with plain peft), trainable weights as safetensors otherwise."""
    from nc_finetune.train.checkpoint import save_weights

    if adapted.method == "lora":
        adapted.model.save_pretrained(str(out / "adapter"))
    save_weights(out / "trainable.safetensors", adapted.trainable_state_dict())


def select_stage(recipe: Recipe, out: Path, *, overwrite: bool = False, progress: bool = True):
    """Probe (or reuse ``out/probe.json`` made with the same recipe) and select; write ``selection.json``."""
    from nc_finetune.probe.result import ProbeResult

    check_out_dir(out, ["selection.json"], overwrite)
    prepared = prepare_data(recipe)
    backbone = load_recipe_backbone(recipe)
    check_selection_feasible(recipe, backbone, prepared.data.num_classes)
    probe_path = out / "probe.json"
    reuse = probe_path.exists() and ProbeResult.load(probe_path).meta.get("recipe", {}).get("probe") == \
        recipe_to_dict(recipe)["probe"]
    if reuse:
        probe_result = ProbeResult.load(probe_path)
    else:
        probe_result = run_probe_stage(recipe, out, overwrite=True, progress=progress, prepared=prepared,
                                       backbone=backbone)
    selection = run_select_stage(recipe, backbone, probe_result, prepared, prepared.data.num_classes)
    selection.save(out / "selection.json")
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
    from safetensors.torch import load_file

    from nc_finetune.probe.result import ProbeResult
    from nc_finetune.select import Selection
    from nc_finetune.train.loop import TrainData, Trainer

    run_dir = Path(run_dir)
    needed = ["resolved.yaml", "selection.json", "probe.json", "trainable.safetensors"]
    missing = [n for n in needed if not (run_dir / n).exists()]
    if missing:
        raise UserError(f"{run_dir} is not a finished run: missing {', '.join(missing)}")
    for item in data_overrides or []:
        if not item.split("=", 1)[0].strip().startswith("data."):
            raise ConfigError(f"eval accepts only data.* overrides (the rest describes the trained model); "
                              f"got {item!r}")
    recipe = load_recipe(run_dir / "resolved.yaml", data_overrides)
    if batch_size:
        recipe.train.eval_batch_size = batch_size
    recipe.train.cache_prefix = "off"
    data = prepare_data(recipe).data
    probe_result = ProbeResult.load(run_dir / "probe.json")
    trained_classes = probe_result.meta.get("class_names")
    if trained_classes is not None and len(trained_classes) != data.num_classes:
        raise DataError(f"{run_dir} was trained on {len(trained_classes)} classes; data '{data.name}' has "
                        f"{data.num_classes}")
    backbone = load_recipe_backbone(recipe)
    selection = Selection.load(run_dir / "selection.json")
    adapted = build_recipe_classifier(recipe, backbone, data.num_classes, selection, probe_result, data.train)
    weights = load_file(str(run_dir / "trainable.safetensors"))
    unexpected = set(weights) - set(adapted.model.state_dict())
    if unexpected:
        raise UserError(f"{run_dir}/trainable.safetensors does not fit the rebuilt model ({sorted(unexpected)[0]})")
    adapted.model.load_state_dict(weights, strict=False)
    splits = {"test": data.test, "train": data.train}
    if split not in splits:
        raise UserError(f"eval --split must be one of {', '.join(splits)}; got {split!r}")
    trainer = Trainer(adapted, backbone, TrainData(train=data.train, test=data.test), recipe.train, run_dir,
                      progress=False)
    adapted.model.to(trainer.device)
    return {"split": split, **trainer.evaluate(split, splits[split])}


_SCORE_KEYS = ("nc1", "nc1_trace", "cdnv", "ncc_accuracy", "lp_accuracy", "logme", "hscore", "ncti_seli_raw",
               "ncti_ncc_raw", "ncti_vc_raw")


def rank_stage(recipe: Recipe, out: Path, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Rank ``recipe.rank.candidates`` (and each one's layers) by collapse and transferability scores.

    Every candidate is probed once on the same probe subset with ``transfer_scores`` on, so NC1, trace ratio,
    CDNV, LogME and H-score come from one streaming pass (NCTI from the per-layer reservoir); the parameter count is
    the static size baseline. Ground truth is the test accuracy of a training run per candidate
    (``rank.finetune``) or the probe's held-out linear-probe accuracy. Writes ``rank.json``, ``rank.png`` and
    ``candidates/<label>/`` (probe.json/png, and run/ when fine-tuning).

    Returns:
        The content of ``rank.json``.
    """
    import dataclasses
    import re

    from nc_finetune.config import BackboneConfig, from_dict
    from nc_finetune.probe.runner import probe
    from nc_finetune.report.plots import plot_probe
    from nc_finetune.transfer.ranking import plot_rank, rank_table
    from nc_finetune.utils.env import library_versions, seed_everything
    from nc_finetune.utils.io import write_json_atomic

    out = Path(out)
    check_out_dir(out, ["rank.json", "rank.png"], overwrite)
    cands: list[tuple[str, BackboneConfig]] = []
    for i, raw in enumerate(recipe.rank.candidates):
        raw = dict(raw)
        label = raw.pop("label", None)
        cfg = from_dict(BackboneConfig, raw, f"rank.candidates[{i}]")
        default = cfg.name + (f"@{cfg.truncate_at}" if cfg.truncate_at is not None else "") + \
            ("" if cfg.pretrained else " (random init)")
        cands.append((str(label) if label else default, cfg))
    if len(cands) < 2:
        raise ConfigError("rank.candidates needs at least 2 backbone sections, e.g. "
                          "[{name: efficientnet-lite0}, {name: efficientnet-lite0, pretrained: false}]")
    labels = [c[0] for c in cands]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"rank.candidates: labels must be unique (got {labels}); add a 'label' to each")
    if not recipe.rank.finetune and not recipe.probe.linear_probe:
        raise ConfigError("rank needs a ground truth: set rank.finetune=true or probe.linear_probe=true")

    prepared = prepare_data(recipe)
    data = prepared.data
    p = recipe.probe
    rows, layers = [], {}
    for label, cfg in cands:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")
        cand_recipe = dataclasses.replace(recipe, backbone=cfg)
        seed_everything(p.seed)
        backbone = load_recipe_backbone(cand_recipe)
        result = probe(backbone, prepared.probe_split, data.num_classes, batch_size=p.batch_size,
                       ncc_samples=p.ncc_samples, linear_probe=p.linear_probe, autocast=p.autocast, device=p.device,
                       seed=p.seed, progress=progress, transfer_scores=True,
                       meta={"dataset": data.name, "candidate": label})
        cand_dir = out / "candidates" / slug
        cand_dir.mkdir(parents=True, exist_ok=True)
        result.save(cand_dir / "probe.json")
        plot_probe(result, cand_dir / "probe.png")
        last = result.layers[-1]
        row = {"name": label, "backbone": cfg.name, "pretrained": cfg.pretrained, "params": backbone.num_params(),
               "probe_seconds": result.meta["seconds"], **{k: last[k] for k in _SCORE_KEYS if k in last}}
        if recipe.rank.finetune:
            summary = run_stage(cand_recipe, cand_dir / "run", progress=progress)
            row["finetune_accuracy"] = summary["test_accuracy"]
        rows.append(row)
        layer_rows, size = [], 0
        for rec in result.blocks():
            size += rec["num_params"]  # a model truncated after this block
            layer_rows.append({"name": rec["name"], "num_params": size,
                               **{k: rec[k] for k in _SCORE_KEYS if k in rec}})
        layers[label] = {"rows": layer_rows, **rank_table(layer_rows, "lp_accuracy" if p.linear_probe else None)}
    truth = "finetune_accuracy" if recipe.rank.finetune else "lp_accuracy"
    table = rank_table(rows, truth)
    report = {"dataset": data.name, "num_classes": data.num_classes, "probe_samples": len(prepared.probe_split),
              **table, "truth_key": truth, "rows": rows, "layers": layers, "recipe": recipe_to_dict(recipe),
              "versions": library_versions()}
    write_json_atomic(out / "rank.json", report)
    plot_rank(rows, truth, out / "rank.png", title=f"{len(rows)} backbones on {data.name}: scores vs {truth}")
    return report
