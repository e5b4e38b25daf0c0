"""Per-block transfer sweep and selection regret: the measuring stick for every selection rule.

``nc-finetune sweep`` fine-tunes every candidate block set alone (every single block, adjacent pairs, or a list),
for every seed and learning rate, each as an ordinary run directory under ``DIR/cells/``. The best candidate by mean
test accuracy is the *oracle* (the best by mean validation accuracy is reported beside it). Every selection strategy
then picks blocks under each budget of ``sweep.budgets`` from the same seed's probe; a pick that is not a candidate
is trained as an extra cell. A strategy's *regret* is the oracle's test accuracy minus its pick's, paired per seed, in
accuracy points, with a 95% t-interval over seeds; Kendall τ and weighted τ compare its block scores with the
per-block accuracy. Methods that need no block choice (``sweep.references``: linear probe, full fine-tuning, Auto-RGN)
train beside the cells, and each pick is compared with them, paired per seed. ``sweep.json`` holds all of it,
``sweep.png`` the per-block curve beside the collapse metrics.

Seeds resample everything a user's data would: ``data.seed`` (training and test subsets, corruption noise),
``probe.seed`` (the probe subset), ``train.seed`` (validation split, head init, data order) and ``selection.seed``.
With several learning rates each candidate's rate is chosen by its mean validation accuracy, never on test.
A killed sweep resumes: finished cells are read back, an interrupted cell resumes from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nc_finetune import runs
from nc_finetune.config import SWEEP_NOT_SCORED, Recipe, SweepBudget, recipe_to_dict
from nc_finetune.errors import ConfigError, DataError, UserError
from nc_finetune.runs import RunDir

_NOT_SCORED = SWEEP_NOT_SCORED  # all ignores budgets, manual is the user's own choice
#: Recipe sections that a resumed sweep may change: they decide what is picked and scored, not what a cell trains.
_GROWABLE = ("sweep", "selection", "description")
#: Metrics drawn beside the per-block accuracy in ``sweep.png`` (probe keys, all lower = more collapsed).
PLOT_METRICS = ("nc1", "nc1_trace", "cdnv")


# -------------------------------------------------------------------------------------------------------- candidates


def resolve_candidates(spec: str | Sequence[Sequence[int | str]], blocks: Sequence[Any]) -> list[tuple[int, ...]]:
    """Candidate block sets as sorted index tuples.

    Args:
        spec: ``blocks``, ``pairs``, or a list of block lists (indices, negative from the end, or names).
        blocks: The backbone's blocks (``index``, ``name``).

    Raises:
        ConfigError: an unknown word, a block that does not exist, or the same candidate twice.
    """
    indices = [b.index for b in sorted(blocks, key=lambda b: b.index)]
    if spec == "blocks":
        return [(i,) for i in indices]
    if spec == "pairs":
        if len(indices) < 2:
            raise ConfigError("sweep.candidates=pairs needs a backbone with at least two blocks")
        return [(a, b) for a, b in zip(indices, indices[1:], strict=False)]
    if isinstance(spec, str):
        raise ConfigError(f"sweep.candidates must be blocks, pairs or a list of block lists; got {spec!r}")
    from nc_finetune.select.strategies import resolve_manual

    out: list[tuple[int, ...]] = []
    for cand in spec:
        try:
            chosen = tuple(sorted(resolve_manual(blocks, list(cand))))
        except ConfigError as e:
            raise ConfigError(f"sweep.candidates {list(cand)}: {e}") from None
        if chosen in out:
            raise ConfigError(f"sweep.candidates lists {list(cand)} twice")
        out.append(chosen)
    return out


def _block_names_without_weights(recipe: Recipe) -> list[Any] | None:
    """The backbone's blocks from its architecture alone (built on the meta device, no weights read), or ``None``
    when this backbone cannot be built that way (then the real load checks the candidates)."""
    import torch

    from nc_finetune.backbones import load_backbone

    b = recipe.backbone
    if b.init_from or b.truncate_at is not None:
        return None
    try:
        with torch.device("meta"):
            bb = load_backbone(b.name, pooling=b.pooling, image_size=b.image_size, max_length=b.max_length,
                               pretrained=False)
        return list(bb.blocks)
    except Exception:  # noqa: BLE001 - any failure only means "check after the real load"
        return None


# ---------------------------------------------------------------------------------------------------------- recipes


def seeded_recipe(recipe: Recipe, seed: int) -> Recipe:
    """The recipe with every seed set to ``seed`` (data, probe, train, selection)."""
    return dataclasses.replace(
        recipe,
        data=dataclasses.replace(recipe.data, seed=seed),
        probe=dataclasses.replace(recipe.probe, seed=seed),
        train=dataclasses.replace(recipe.train, seed=seed),
        selection=dataclasses.replace(recipe.selection, seed=seed),
    )


def _with_selection(recipe: Recipe, **changes: Any) -> Recipe:
    return dataclasses.replace(recipe, selection=dataclasses.replace(recipe.selection, **changes))


def cell_recipe(recipe: Recipe, seed: int, names: Sequence[str], lr: float) -> Recipe:
    """The ``run`` recipe of one cell: the seeded recipe, these blocks (``manual``), this learning rate.

    Its ``selection`` section holds only the blocks and the seed (the strategies' options do not change what a
    cell trains), and its ``sweep`` section is the default: so a sweep whose strategies, budgets or grid grow keeps
    every finished cell.
    """
    from nc_finetune.config import SelectionConfig, SweepConfig

    r = seeded_recipe(recipe, seed)
    r = dataclasses.replace(r, selection=SelectionConfig(strategy="manual", blocks=list(names), max_blocks=None,
                                                         seed=seed), sweep=SweepConfig())
    return dataclasses.replace(r, train=dataclasses.replace(r.train, lr=float(lr)))


def reference_recipe(recipe: Recipe, seed: int, names: Sequence[str], lr: float, method: str) -> Recipe:
    """The ``run`` recipe of a reference cell: :func:`cell_recipe` on every block, trained by ``method``.

    A linear probe trains only the head, so the grid has to move the head's rate to tune it: ``train.head_lr`` is
    scaled by ``lr / train.lr`` (the recipe's rate is the grid's ×1 point); without a ``head_lr`` the head already
    trains at ``lr``.
    """
    r = cell_recipe(recipe, seed, names, lr)
    r = dataclasses.replace(r, adapt=dataclasses.replace(r.adapt, method=method))
    if method == "linear_probe" and recipe.train.head_lr is not None and recipe.train.lr > 0:
        head_lr = recipe.train.head_lr * float(lr) / recipe.train.lr
        r = dataclasses.replace(r, train=dataclasses.replace(r.train, head_lr=head_lr))
    return r


def parse_strategy(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name@key=value,key=value`` (:func:`~nc_finetune.config.parse_sweep_strategy`, which the
    recipe's sweep section also runs, so ``validate`` refuses a bad variant)."""
    from nc_finetune.config import parse_sweep_strategy

    return parse_sweep_strategy(spec)


def _strategy_recipe(recipe: Recipe, spec: str, budget: SweepBudget) -> Recipe:
    name, options = parse_strategy(spec)
    return _with_selection(recipe, **options, strategy=name, max_blocks=budget.max_blocks,
                           max_param_fraction=budget.max_param_fraction, blocks=None)


def default_strategies() -> list[str]:
    """Every registered strategy a sweep can score."""
    from nc_finetune.select.strategies import STRATEGIES

    return [s for s in STRATEGIES if s not in _NOT_SCORED]


# ------------------------------------------------------------------------------------------------------- statistics


def mean_ci95(values: Sequence[float]) -> dict[str, Any]:
    """Mean and two-sided 95% Student-t interval of independent values (``ci95`` is ``None`` for one value)."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = float(v.mean())
    if v.size < 2:
        return {"mean": mean, "ci95": None, "n": 1}
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": int(v.size)}


def verdict(stat: Mapping[str, Any]) -> str:
    """``win``, ``loss`` or ``tie`` for a paired difference: a tie when its 95% interval contains zero."""
    ci = stat.get("ci95")
    if stat.get("mean") is None or ci is None:
        return "tie"
    if ci[0] > 0:
        return "win"
    if ci[1] < 0:
        return "loss"
    return "tie"


def _fits(cell: Mapping[str, Any], budget: SweepBudget, backbone_params: int) -> bool:
    if budget.max_blocks is not None and len(cell["indices"]) > budget.max_blocks:
        return False
    return budget.max_param_fraction is None or cell["block_params"] <= budget.max_param_fraction * backbone_params


def _paired_vs(acc: Mapping[str, float], rival: Mapping[str, float]) -> dict[str, Any]:
    """Mean and 95% interval of ``acc - rival`` in points over the seeds both have, with its verdict."""
    stat = mean_ci95([100.0 * (a - rival[s]) for s, a in acc.items() if rival.get(s) is not None])
    return {**stat, "verdict": verdict(stat)}


def floors(report: Mapping[str, Any]) -> dict[str, Any]:
    """The regret of two hindsight choices: how finely the sweep can tell a good rule from a lucky one.

    The test oracle is the best of many noisy means, so its accuracy is biased upwards and even a perfect rule has a
    positive regret against it. Two choices no selection rule can be expected to beat measure that floor:

    * ``exhaustive_val``: train every candidate and keep, on each seed, the block set with that seed's best
      validation accuracy among those trained on it (what a user with the budget for the whole sweep would do; ties
      go to the smaller set);
    * ``other_seeds``: on each seed, the candidate with the best mean test accuracy over the *other* seeds (the best
      fixed choice, known in hindsight but not fitted to this seed's test noise; needs two seeds or more).

    A rule whose regret is at the floor is as good as the sweep can measure; rules that tie ``random_k`` while the
    floor beats it are worse than they could be, and a floor that ties ``random_k`` says the blocks hardly differ.

    Args:
        report: A sweep report (``summarize``'s output with ``budgets``, ``backbone_params`` and ``seeds`` added, or
            a ``sweep.json`` read back): seeds may be ints or strings.

    Returns:
        ``{budget_label: {choice: {"picks", "test_accuracy", "per_seed", "mean", "ci95", "n", "vs_random_k",
        "vs_last_k"}}}`` (regret in points, paired per seed, as for a strategy).
    """
    from types import SimpleNamespace

    seeds = [str(s) for s in report["seeds"]]

    def by_seed(values: Mapping[Any, Any]) -> dict[str, Any]:
        return {str(k): v for k, v in values.items() if v is not None}

    out: dict[str, Any] = {}
    for b in report.get("budgets", []):
        budget = SimpleNamespace(max_blocks=b.get("max_blocks"), max_param_fraction=b.get("max_param_fraction"))
        label = b["label"]
        oracle = (report.get("oracle") or {}).get(label)
        if oracle is None:
            continue
        eligible = [(c, by_seed(c["test_accuracy"]), by_seed(c["val_accuracy"])) for c in report["cells"]
                    if c.get("mean_test") is not None and _fits(c, budget, report["backbone_params"])]
        best = next(test for c, test, _ in eligible if list(c["indices"]) == list(oracle["by_test"]["indices"]))
        choices: dict[str, dict[str, Any]] = {"exhaustive_val": {}, "other_seeds": {}}
        for s in seeds:
            with_val = [(val[s], c, test) for c, test, val in eligible if s in val and s in test]
            if with_val:
                _, c, test = max(with_val, key=lambda vct: (vct[0], -vct[1]["block_params"]))
                choices["exhaustive_val"][s] = (c, test)
            others = [(float(np.mean([test[t] for t in seeds if t != s and t in test])), c, test)
                      for c, test, _ in eligible if s in test and any(t in test for t in seeds if t != s)]
            if others:
                _, c, test = max(others, key=lambda mct: (mct[0], -mct[1]["block_params"]))
                choices["other_seeds"][s] = (c, test)
        rivals = {r: by_seed(report["regret"].get(label, {}).get(r, {}).get("test_accuracy", {}))
                  for r in ("random_k", "last_k")}
        table = {}
        for name, chosen in choices.items():
            if not chosen:
                continue
            acc = {s: test[s] for s, (_, test) in chosen.items()}
            per_seed = {s: 100.0 * (best[s] - a) for s, a in acc.items() if s in best}
            entry = {"picks": {s: c["names"] for s, (c, _) in chosen.items()}, "test_accuracy": acc,
                     "per_seed": per_seed, **mean_ci95(list(per_seed.values()))}
            for rival, rival_acc in rivals.items():
                if rival_acc:
                    entry[f"vs_{rival}"] = _paired_vs(acc, rival_acc)
            table[name] = entry
        out[label] = table
    return out


def choose_lr(per_lr: Mapping[float, Mapping[str, Mapping[int, float | None]]]) -> float:
    """The learning rate with the best mean validation accuracy over seeds (the only one if there is one).

    Ties go to the smaller rate. Test accuracy is never looked at.
    """
    rates = sorted(per_lr)
    if len(rates) == 1:
        return rates[0]

    def mean_val(lr: float) -> float:
        vals = [v for v in per_lr[lr]["val"].values() if v is not None]
        return float(np.mean(vals)) if vals else -math.inf

    return max(rates, key=lambda lr: (mean_val(lr), -lr))


def summarize(
    cells: Sequence[Mapping[str, Any]],
    picks: Mapping[int, Mapping[str, Mapping[str, Sequence[int]]]],
    scores: Mapping[int, Mapping[str, Mapping[int, float]]],
    budgets: Sequence[SweepBudget],
    seeds: Sequence[int],
    backbone_params: int,
    costs: Mapping[str, float] | None = None,
    references: Mapping[str, Mapping[str, Any]] | None = None,
    stability: Mapping[int, Mapping[str, Mapping[str, float]]] | None = None,
) -> dict[str, Any]:
    """Oracle and regret from finished cells (pure arithmetic; no model involved).

    Args:
        cells: One dict per block set: ``indices``, ``names``, ``block_params``, ``kind`` and ``per_lr``
            (``{lr: {"val": {seed: acc}, "test": {seed: acc}}}``, accuracies in [0, 1]).
        picks: ``{seed: {budget_label: {strategy: indices}}}``.
        scores: ``{seed: {strategy: {block_index: score}}}`` (higher = tune first) for the τ columns.
        budgets: The sweep's budgets.
        seeds: The sweep's seeds.
        backbone_params: Parameters of the backbone (for fraction budgets).
        costs: Mean selection cost in seconds per strategy.
        references: Per adapt method trained beside the cells (``sweep.references``): ``per_lr`` as for a cell and
            ``trainable_params``. Each strategy's pick is compared with each (``vs_references``, paired per seed).
        stability: ``{seed: {budget_label: {strategy: share}}}``: for ``bootstrap`` variants, the share of resampled
            probes that chose the pick (``bootstrap_stability``: its mean over seeds).

    Returns:
        ``{"cells", "oracle", "regret", "references"}`` as written to ``sweep.json`` (accuracy differences in
        points).
    """
    from nc_finetune.transfer.ranking import correlations

    refs: dict[str, Any] = {}
    for method, ref in (references or {}).items():
        lr = choose_lr(ref["per_lr"])
        test = {int(s): ref["per_lr"][lr]["test"].get(s) for s in seeds}
        tv = [v for v in test.values() if v is not None]
        refs[method] = {"lr": lr, "trainable_params": ref.get("trainable_params"), "test_accuracy": test,
                        "val_accuracy": {int(s): ref["per_lr"][lr]["val"].get(s) for s in seeds},
                        "mean_test": float(np.mean(tv)) if tv else None,
                        "sd_test": float(np.std(tv, ddof=1)) if len(tv) > 1 else None,
                        "per_lr": {str(k): v for k, v in ref["per_lr"].items()}}
    rows = []
    for c in cells:
        lr = choose_lr(c["per_lr"])
        test = {int(s): c["per_lr"][lr]["test"].get(s) for s in seeds}
        val = {int(s): c["per_lr"][lr]["val"].get(s) for s in seeds}
        tv = [v for v in test.values() if v is not None]
        vv = [v for v in val.values() if v is not None]
        rows.append({**{k: c[k] for k in ("indices", "names", "block_params", "kind")},
                     "trainable_params": c.get("trainable_params"), "lr": lr, "seeds": list(seeds),
                     "val_accuracy": val, "test_accuracy": test,
                     "mean_test": float(np.mean(tv)) if tv else None,
                     "sd_test": float(np.std(tv, ddof=1)) if len(tv) > 1 else None,
                     "mean_val": float(np.mean(vv)) if vv else None,
                     "per_lr": {str(k): v for k, v in c["per_lr"].items()}})
    by_key = {tuple(r["indices"]): r for r in rows}
    singles = {r["indices"][0]: r for r in rows if r["kind"] == "candidate" and len(r["indices"]) == 1}
    oracle: dict[str, Any] = {}
    regret: dict[str, Any] = {}
    for budget in budgets:
        label = budget.label
        # the oracle is searched among block sets trained on every seed: a pick trained for one seed only is not
        # comparable (its mean is one draw, and the other seeds' regret would be undefined)
        eligible = [r for r in rows if _fits(r, budget, backbone_params)
                    and all(r["test_accuracy"].get(s) is not None for s in seeds)]
        if not eligible:
            continue
        best = max(eligible, key=lambda r: (r["mean_test"], -r["block_params"]))
        with_val = [r for r in eligible if r["mean_val"] is not None]
        best_val = max(with_val, key=lambda r: (r["mean_val"], -r["block_params"])) if with_val else None
        oracle[label] = {
            "by_test": {"blocks": best["names"], "indices": best["indices"], "mean_test": best["mean_test"],
                        "lr": best["lr"]},
            "by_val": None if best_val is None else {"blocks": best_val["names"], "indices": best_val["indices"],
                                                     "mean_test": best_val["mean_test"],
                                                     "mean_val": best_val["mean_val"], "lr": best_val["lr"]},
            "searched": len(eligible),
        }
        strategies = sorted({s for seed in seeds for s in picks.get(seed, {}).get(label, {})})
        pick_acc: dict[str, dict[int, float]] = {}
        for strategy in strategies:
            acc = {}
            for seed in seeds:
                idx = picks.get(seed, {}).get(label, {}).get(strategy)
                cell = by_key.get(tuple(idx)) if idx is not None else None
                if cell is not None and cell["test_accuracy"].get(seed) is not None:
                    acc[seed] = cell["test_accuracy"][seed]
            pick_acc[strategy] = acc
        table = {}
        for strategy in strategies:
            acc = pick_acc[strategy]
            per_seed = {s: 100.0 * (best["test_accuracy"][s] - a) for s, a in acc.items()
                        if best["test_accuracy"].get(s) is not None}
            vs_val_oracle = {s: 100.0 * (best_val["test_accuracy"][s] - a) for s, a in acc.items()
                             if best_val is not None and best_val["test_accuracy"].get(s) is not None}
            taus = [correlations([scores[s][strategy].get(i, math.nan) for i in sorted(singles)],
                                 [singles[i]["mean_test"] for i in sorted(singles)], lower_is_better=False)
                    for s in seeds if strategy in scores.get(s, {})] if len(singles) >= 3 else []
            picked = {s: tuple(picks[s][label][strategy]) for s in seeds if strategy in picks.get(s, {}).get(label, {})}
            entry = {
                "picks": {str(s): by_key[idx]["names"] if idx in by_key else None for s, idx in picked.items()},
                "test_accuracy": {str(s): a for s, a in acc.items()},
                "per_seed": {str(s): r for s, r in per_seed.items()},
                **mean_ci95(list(per_seed.values())),
                "vs_val_oracle": mean_ci95(list(vs_val_oracle.values()))["mean"],
                "kendall_tau": _nanmean([t["kendall_tau"] for t in taus]),
                "weighted_tau": _nanmean([t["weighted_tau"] for t in taus]),
                "cost_seconds": None if costs is None else costs.get(strategy),
            }
            shares = [stability[s][label][strategy] for s in seeds
                      if strategy in (stability or {}).get(s, {}).get(label, {})]
            if shares:
                entry["bootstrap_stability"] = {"mean": float(np.mean(shares)), "per_seed": shares}
            for rival in ("random_k", "last_k"):
                if rival in pick_acc and rival != strategy:
                    entry[f"vs_{rival}"] = _paired_vs(acc, pick_acc[rival])
            if refs:
                entry["vs_references"] = {method: _paired_vs(acc, ref["test_accuracy"]) for method, ref in refs.items()}
            table[strategy] = entry
        regret[label] = table
    return {"cells": rows, "oracle": oracle, "regret": regret, "references": refs}


def _selection_as_now(recipe: Recipe, recorded: Any) -> Any:
    """A recorded ``selection`` section read through today's schema (fields added since take their defaults)."""
    from nc_finetune.config import SelectionConfig, from_dict

    if not isinstance(recorded, dict):
        return recorded
    try:
        section = from_dict(SelectionConfig, recorded, "selection")
    except ConfigError:
        return recorded
    return recipe_to_dict(dataclasses.replace(recipe, selection=section))["selection"]


def _rows(split: Any) -> int | None:
    """Rows of a split; ``None`` for a stream never counted (``data.streaming`` without a sample size)."""
    try:
        return len(split)
    except DataError:
        return None


def _nanmean(values: Sequence[float]) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else None


# ------------------------------------------------------------------------------------------------------------ stage


def _slug(names: Sequence[str]) -> str:
    return "+".join(names).replace("/", "_")


def _fmt_time(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def cells_to_train(candidates: Sequence[tuple[int, ...]], picks: Sequence[Mapping[str, Mapping[str, Sequence[int]]]],
                   strategies: Sequence[str], budgets: Sequence[str]) -> list[tuple[tuple[int, ...], str]]:
    """Every candidate, then every block set picked under one of these budgets by one of these strategies that is not
    a candidate, as ``(indices, "candidate" | "pick")``.

    ``picks`` holds each seed's ``{budget: {strategy: indices}}``. A resumed sweep keeps the picks of budgets and
    strategies it no longer asks for; their block sets are not trained.
    """
    extra = sorted({tuple(sorted(idx)) for by_budget in picks for label, by_s in by_budget.items() if label in budgets
                    for strategy, idx in by_s.items() if strategy in strategies} - set(candidates))
    return [(c, "candidate") for c in candidates] + [(c, "pick") for c in extra]


def sweep_stage(recipe: Recipe, out: Path, *, progress: bool = True, echo=print) -> dict[str, Any]:
    """Run (or resume) a sweep into ``out``; write ``sweep.json`` and ``sweep.png``.

    Args:
        recipe: Validated recipe with a ``sweep`` section (and the ``adapt``/``train`` sections every cell uses).
        out: Sweep directory: ``resolved.yaml``, ``seeds/seed<S>/`` (probe and picks), ``cells/<blocks>/seed<S>/
            lr<LR>/`` (one ordinary run directory per cell), ``sweep.json``, ``sweep.png``.
        progress: tqdm bars inside the cells.
        echo: Where the per-cell progress lines go.

    Returns:
        The content of ``sweep.json``.

    Raises:
        ConfigError: unknown strategy or candidate, a block that does not exist (before any weights load where the
            architecture can be built without them), a directory holding a sweep of another recipe.
    """
    from nc_finetune.pipeline import choose_blocks, load_recipe_backbone, prepare_data, run_pipeline, run_probe_stage
    from nc_finetune.select import select_blocks
    from nc_finetune.select.strategies import STRATEGIES, strategy_needs_probe
    from nc_finetune.utils.env import check_recipe_devices, library_versions, seed_everything
    from nc_finetune.utils.io import write_json_atomic

    check_recipe_devices(recipe)
    cfg = recipe.sweep
    run = RunDir(out)
    explicit = cfg.strategies is not None
    strategies = list(cfg.strategies) if explicit else default_strategies()
    names = [parse_strategy(s)[0] for s in strategies]  # also checks each variant's options
    unknown = [s for s, name in zip(strategies, names, strict=True) if name not in STRATEGIES or name in _NOT_SCORED]
    if unknown:
        raise ConfigError(f"sweep.strategies: {unknown[0]!r} cannot be scored; choose from "
                          f"{', '.join(default_strategies())}")
    if run.has(runs.RESOLVED):
        # The sweep and selection sections may grow (more seeds, rates, candidates, strategies, budgets): the
        # finished cells stay valid. Everything that decides what a cell trains must match.
        # read through today's schema: a key added since the sweep began reads as its default, not as a change
        diff = run.recipe_difference(recipe_to_dict(recipe), ignore=_GROWABLE)
        if diff is not None:
            raise UserError(f"{run.path} holds a sweep of another recipe ({diff}); rerun it with the same recipe "
                            "to resume, or choose another --out")
    elif run.path.exists() and any(p.name != runs.LOCK for p in run.path.iterdir()):
        raise UserError(f"{run.path} is not empty and holds no sweep; choose another --out")
    arch_blocks = _block_names_without_weights(recipe)
    if arch_blocks is not None:
        resolve_candidates(cfg.candidates, arch_blocks)
    lrs = [float(x) for x in (cfg.lr_grid or [recipe.train.lr])]
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_recipe(recipe)

    # Phase 1, per seed: data, probe, every strategy's picks (cheap next to training; finds bad input early).
    seeds = list(cfg.seeds)
    state: dict[int, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    costs: dict[str, list[float]] = {s: [] for s in strategies}
    blocks = None
    candidates: list[tuple[int, ...]] = []
    for seed in seeds:
        srecipe = seeded_recipe(recipe, seed)
        prepared = prepare_data(srecipe)
        seed_everything(seed)
        backbone = load_recipe_backbone(srecipe)
        if blocks is None:
            blocks = sorted(backbone.blocks, key=lambda b: b.index)
            candidates = resolve_candidates(cfg.candidates, blocks)
        seed_dir = RunDir(run / "seeds" / f"seed{seed}")
        if seed_dir.has(runs.PROBE):
            probe_result = seed_dir.read_probe()
        else:
            probe_result = run_probe_stage(srecipe, seed_dir.path, overwrite=True, progress=progress,
                                           prepared=prepared, backbone=backbone)
        # Picks already made (a resumed sweep) are kept; strategies added since are picked now.
        saved = seed_dir.read_json("picks.json") if seed_dir.has("picks.json") else {}
        selection_now = recipe_to_dict(srecipe)["selection"]
        if _selection_as_now(srecipe, saved.get("selection")) != selection_now:  # other options: stale picks
            saved = {}
        picks: dict[str, dict[str, list[int]]] = saved.get("picks", {})
        scores: dict[str, dict[int, float]] = {s: {int(k): (math.nan if v is None else v) for k, v in d.items()}
                                               for s, d in saved.get("scores", {}).items()}
        seed_costs: dict[str, float] = dict(saved.get("costs", {}))
        unpicked: dict[str, dict[str, str]] = saved.get("unpicked", {})
        stable: dict[str, dict[str, float]] = saved.get("stability", {})
        inputs_cache: dict = {}  # trials, gradients and resampled probes: computed once for every budget
        todo = [(b, s) for b in cfg.budgets for s in strategies
                if s not in picks.get(b.label, {}) and s not in unpicked.get(b.label, {})]
        for budget, strategy in todo:
            start = time.perf_counter()
            try:
                sel = choose_blocks(_strategy_recipe(srecipe, strategy, budget), backbone, probe_result,
                                    prepared, prepared.data.num_classes, inputs_cache=inputs_cache)
            except (ConfigError, DataError) as e:
                # It cannot run on this recipe (e.g. shift without reference data) or pick under this budget
                # (e.g. fill=stop and its first block is larger than the budget): recorded, not scored.
                unpicked.setdefault(budget.label, {})[strategy] = str(e)
                continue
            spent = time.perf_counter() - start
            if strategy_needs_probe(parse_strategy(strategy)[0]):
                spent += float(probe_result.meta.get("seconds", 0.0))
            # what choosing costs once (its inputs are shared by every budget), not the sum over budgets
            seed_costs[strategy] = max(seed_costs.get(strategy, 0.0), spent)
            picks.setdefault(budget.label, {})[strategy] = sel.indices
            if "bootstrap" in sel.details:
                stable.setdefault(budget.label, {})[strategy] = float(sel.details["bootstrap"]["stability"])
            scores[strategy] = {int(k): float(v) for k, v in sel.scores.items()}
        if todo or not seed_dir.has("picks.json"):
            write_json_atomic(seed_dir / "picks.json", {"picks": picks, "scores": scores, "costs": seed_costs,
                                                        "unpicked": unpicked, "stability": stable,
                                                        "selection": selection_now})
        for label, by_s in unpicked.items():
            for strategy, why in by_s.items():
                skipped.setdefault(f"{strategy} ({label})", why)
        for s, c in seed_costs.items():
            if s in strategies:
                costs.setdefault(s, []).append(c)
        state[seed] = {"recipe": srecipe, "prepared": prepared, "probe": probe_result, "picks": picks,
                       "scores": scores, "stability": stable, "feature_dim": backbone.feature_dim,
                       "backbone_params": backbone.num_params()}
        del backbone  # each cell loads its own; only its sizes are needed here

    # Phase 2: every candidate and every pick that is not one, for every seed and rate.
    assert blocks is not None
    cell_keys = cells_to_train(candidates, [st["picks"] for st in state.values()], strategies,
                               [b.label for b in cfg.budgets])
    by_index = {b.index: b for b in blocks}
    backbone_params = state[seeds[0]]["backbone_params"]
    total = (len(cell_keys) + len(cfg.references)) * len(seeds) * len(lrs)
    done, spent, fresh = 0, 0.0, 0
    results: dict[tuple[int, ...], dict[float, dict[str, dict[int, float | None]]]] = {}
    trainable: dict[tuple[int, ...], int] = {}
    ref_results: dict[str, dict[str, Any]] = {}
    for seed in seeds:
        st = state[seed]
        K = st["prepared"].data.num_classes
        head = st["feature_dim"] * K + K
        store: dict = {}
        current_first = None
        for indices, _kind in sorted(cell_keys, key=lambda ck: ck[0]):
            names = [by_index[i].name for i in indices]
            if indices[0] != current_first:  # caches are keyed by first trainable block: keep only this one's
                store.clear()
                current_first = indices[0]
            for lr in lrs:
                cell_dir = RunDir(run / "cells" / _slug(names) / f"seed{seed}" / f"lr{lr:g}")
                start = time.perf_counter()
                if cell_dir.has(runs.SUMMARY):
                    summary = cell_dir.read_summary()
                else:
                    sel = select_blocks(None, blocks, strategy="manual", manual=list(indices), head_params=head,
                                        total_params=backbone_params + head)
                    summary = run_pipeline(cell_recipe(recipe, seed, names, lr), cell_dir.path,
                                           resume=cell_dir.has(runs.RESOLVED), progress=progress,
                                           prepared=st["prepared"], probe_result=st["probe"], selection=sel,
                                           cache_store=store)
                    spent += time.perf_counter() - start
                    fresh += 1
                done += 1
                per = results.setdefault(indices, {}).setdefault(lr, {"val": {}, "test": {}})
                per["val"][seed] = summary.get("val_accuracy")
                per["test"][seed] = summary["test_accuracy"]
                trainable[indices] = int(summary["trainable_params"])
                left = (total - done) * spent / fresh if fresh else 0.0
                val = summary.get("val_accuracy")
                echo(f"[{done}/{total}] {' + '.join(names)} seed {seed} lr {lr:g}: test {summary['test_accuracy']:.4f}"
                     + (f" val {val:.4f}" if val is not None else "")
                     + f" ({time.perf_counter() - start:.0f} s; about {_fmt_time(left)} left)")
        # References: methods that train the same weights whatever is selected (every block passed as selected).
        every = [b.index for b in blocks]
        for method in cfg.references:
            for lr in lrs:
                ref_dir = RunDir(run / "references" / method / f"seed{seed}" / f"lr{lr:g}")
                start = time.perf_counter()
                if ref_dir.has(runs.SUMMARY):
                    summary = ref_dir.read_summary()
                else:
                    sel = select_blocks(None, blocks, strategy="manual", manual=every, head_params=head,
                                        total_params=backbone_params + head)
                    summary = run_pipeline(reference_recipe(recipe, seed, [b.name for b in blocks], lr, method),
                                           ref_dir.path, resume=ref_dir.has(runs.RESOLVED), progress=progress,
                                           prepared=st["prepared"], probe_result=st["probe"], selection=sel)
                    spent += time.perf_counter() - start
                    fresh += 1
                done += 1
                per = ref_results.setdefault(method, {"per_lr": {}})
                lr_row = per["per_lr"].setdefault(lr, {"val": {}, "test": {}})
                lr_row["val"][seed] = summary.get("val_accuracy")
                lr_row["test"][seed] = summary["test_accuracy"]
                per["trainable_params"] = int(summary["trainable_params"])
                left = (total - done) * spent / fresh if fresh else 0.0
                echo(f"[{done}/{total}] reference {method} seed {seed} lr {lr:g}: test "
                     f"{summary['test_accuracy']:.4f} ({time.perf_counter() - start:.0f} s; about {_fmt_time(left)} "
                     "left)")

    cells = [{"indices": list(c), "names": [by_index[i].name for i in c], "kind": kind,
              "block_params": sum(by_index[i].num_params for i in c), "trainable_params": trainable.get(c),
              "per_lr": results[c]} for c, kind in cell_keys]
    picks_all = {s: {label: {k: v for k, v in by_s.items() if k in strategies}
                     for label, by_s in state[s]["picks"].items()} for s in seeds}
    scores_all = {s: state[s]["scores"] for s in seeds}
    mean_costs = {s: float(np.mean(v)) for s, v in costs.items() if v}
    report = summarize(cells, picks_all, scores_all, cfg.budgets, seeds, backbone_params, mean_costs, ref_results,
                       {s: state[s]["stability"] for s in seeds})
    first = state[seeds[0]]
    report.update({
        "backbone": recipe.backbone.name,
        "dataset": first["prepared"].data.name,
        "num_classes": first["prepared"].data.num_classes,
        "blocks": [{"index": b.index, "name": b.name, "num_params": b.num_params} for b in blocks],
        "backbone_params": backbone_params,
        "seeds": seeds,
        "lr_grid": lrs,
        "budgets": [dataclasses.asdict(b) | {"label": b.label} for b in cfg.budgets],
        "candidates": cfg.candidates if isinstance(cfg.candidates, str) else [list(c) for c in candidates],
        "strategies": strategies,
        "unpicked": skipped,
        "probe": {str(s): [{k: r.get(k) for k in ("index", "name", *PLOT_METRICS, "ncc_accuracy")}
                           for r in state[s]["probe"].blocks()] for s in seeds},
        "train_samples": _rows(first["prepared"].data.train),
        "test_samples": _rows(first["prepared"].data.test),
        "recipe": recipe_to_dict(recipe),
        "versions": library_versions(),
    })
    report["floors"] = floors(report)
    write_json_atomic(run / runs.SWEEP, report)
    plot_sweep(report, run / runs.SWEEP_PLOT)
    return report


# ------------------------------------------------------------------------------------------------------------- text


def format_sweep(report: Mapping[str, Any]) -> str:
    """The oracle and the regret table as plain text (what ``nc-finetune sweep`` prints)."""
    lines = [f"{report['backbone']} on {report['dataset']}: {len(report['cells'])} block sets x "
             f"{len(report['seeds'])} seeds x {len(report['lr_grid'])} learning rates"]
    for label, o in report["oracle"].items():
        best = o["by_test"]
        lines.append(f"budget {label}: oracle {' + '.join(best['blocks'])} ({100 * best['mean_test']:.2f}%, best of "
                     f"{o['searched']})" + (f"; best by validation: {' + '.join(o['by_val']['blocks'])}"
                                            if o.get("by_val") else ""))
        for strategy, r in sorted(report["regret"].get(label, {}).items(),
                                  key=lambda kv: (kv[1]["mean"] is None, kv[1]["mean"] or 0.0)):
            ci = r.get("ci95")
            ci_text = f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
            common = Counter(tuple(p) for p in r["picks"].values() if p).most_common(1)
            pick = " + ".join(common[0][0]) if common else "-"
            mean = r["mean"]
            lines.append(f"  {strategy:<10} regret {mean:+.2f}{ci_text} points; picks {pick}"
                         if mean is not None else f"  {strategy:<10} regret n/a")
        for name, f in (report.get("floors") or {}).get(label, {}).items():
            if f["mean"] is not None:
                ci = f.get("ci95")
                lines.append(f"  floor {name}: regret {f['mean']:+.2f}"
                             + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "") + " points (hindsight, not a rule)")
    for method, ref in report.get("references", {}).items():
        if ref["mean_test"] is not None:
            lines.append(f"reference {method}: {100 * ref['mean_test']:.2f}% ({ref['trainable_params']:,} trainable "
                         f"parameters, lr {ref['lr']:g})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------- plot


def plot_sweep(report: Mapping[str, Any], path: str | Path) -> Path:
    """Per-block test accuracy (mean ± sd over seeds) against depth, with the probe's collapse metrics on a second
    axis, the oracle starred and each strategy's most common pick (first budget) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nc_finetune.report.plots import save_figure

    cells = [c for c in report["cells"] if c["kind"] == "candidate" and c["mean_test"] is not None]
    x_of = {b["index"]: k for k, b in enumerate(report["blocks"])}
    xs = [float(np.mean([x_of[i] for i in c["indices"]])) for c in cells]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(report["blocks"]) + 3) + 3.2, 4.8))
    means = np.array([100 * c["mean_test"] for c in cells])
    sds = np.array([100 * (c["sd_test"] or 0.0) for c in cells])
    order = np.argsort(xs)
    ax.errorbar(np.array(xs)[order], means[order], yerr=sds[order], marker="o", color="tab:blue", capsize=3,
                label="test accuracy (mean ± sd over seeds)")
    vals = [(x, 100 * c["mean_val"]) for x, c in zip(xs, cells, strict=True) if c["mean_val"] is not None]
    if vals:
        vals.sort()
        ax.plot([v[0] for v in vals], [v[1] for v in vals], ls="--", color="tab:blue", alpha=0.5,
                label="validation accuracy (mean)")
    ax.set_ylabel("accuracy of tuning this block set alone (%)")
    ax.set_xticks(range(len(report["blocks"])))
    ax.set_xticklabels([b["name"] for b in report["blocks"]], rotation=60, ha="right", fontsize=7)
    budgets = list(report["oracle"])
    if budgets:
        label = budgets[0]
        best = report["oracle"][label]["by_test"]
        bx = float(np.mean([x_of[i] for i in best["indices"]]))
        ax.plot([bx], [100 * best["mean_test"]], marker="*", ms=16, color="gold", mec="black", ls="none",
                label=f"oracle ({label})", zorder=5)
        top = float(np.nanmax(means + sds)) if len(means) else 100.0
        picks = report["regret"].get(label, {})
        markers = "v^<>sPXDdph8"
        for k, (strategy, r) in enumerate(sorted(picks.items())):
            common = Counter(tuple(p) for p in r["picks"].values() if p).most_common(1)
            if not common:
                continue
            idx = [b["index"] for b in report["blocks"] if b["name"] in common[0][0]]
            px = float(np.mean([x_of[i] for i in idx]))
            ax.plot([px], [top + 0.6 + 0.45 * k], marker=markers[k % len(markers)], ls="none", ms=7,
                    label=f"{strategy} pick (regret {r['mean']:+.2f})" if r["mean"] is not None else strategy)
    for k, (method, ref) in enumerate(report.get("references", {}).items()):
        if ref["mean_test"] is not None:
            ax.axhline(100 * ref["mean_test"], ls=":", lw=1.2, color=f"C{(k + 3) % 10}",
                       label=f"{method} (every block; mean)")
    ax2 = ax.twinx()
    colors = {"nc1": "tab:red", "nc1_trace": "tab:orange", "cdnv": "tab:purple"}
    for metric in PLOT_METRICS:
        rows = [[r.get(metric) for r in rows_s] for rows_s in report["probe"].values()]
        arr = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)
        if arr.size == 0 or not np.isfinite(arr).any():
            continue
        ax2.plot(range(arr.shape[1]), np.nanmean(arr, axis=0), color=colors[metric], alpha=0.7, lw=1.2,
                 label=metric)
    ax2.set_yscale("log")
    ax2.set_ylabel("collapse on the training data (lower = more)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    # beside the axes, not over the curve
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left", bbox_to_anchor=(1.09, 1.0), framealpha=0.9)
    data = (report.get("recipe") or {}).get("data") or {}
    shifted = f" ({data['corruption']}, severity {data.get('corruption_severity')})" if data.get("corruption") else ""
    ax.set_title(f"{report['backbone']} on {report['dataset']}{shifted}: one block set tuned at a time "
                 f"({len(report['seeds'])} seeds)", fontsize=10)
    fig.tight_layout()

    try:
        return save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
