"""`policy-engine catalog`: show the effective catalog, check a user catalog, diff two catalogs.

Every figure is printed with where it comes from (`source`, `as_of`, `source_kind`), since a
price is only as good as its source.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date, datetime, timezone
from typing import Any

from . import EXIT_FINDINGS, EXIT_OK, UsageError

PACKAGED = "packaged"
"""The name `catalog diff` gives the packaged catalog."""


def setup_catalog(p: argparse.ArgumentParser) -> None:
    """Show, check and compare model catalogs (models, fast mode, prices, platforms).

    `show [MODEL]` prints the effective entry (the packaged catalog, extended by --catalog)
    with each figure's source; `check FILE` validates a user catalog (file:line:col errors);
    `diff OLD NEW` lists what changed in prices and fast availability, and with --requests
    and --policy what the change does to the cost of a request log. OLD or NEW may be
    `packaged`. Exit 0 on success, 1 when `check` finds errors, 2 on usage errors."""
    verbs = p.add_subparsers(dest="catalog_verb", metavar="SUBCOMMAND", parser_class=type(p))
    show = verbs.add_parser("show", help="the effective entry of a model (or all), with sources",
                            description="Print a model's effective catalog entry on a platform at a date, every "
                                        "figure with its source, as_of and source_kind.")
    show.add_argument("model", nargs="?", metavar="MODEL", help="model id or alias (default: every model)")
    show.add_argument("--platform", default="claude_api", help="claude_api (default), claude_platform_aws, bedrock, "
                                                               "vertex or foundry")
    show.add_argument("--at", metavar="DATE", help="decision date for fast availability (YYYY-MM-DD; default today)")
    show.add_argument("--catalog", metavar="FILE", help="catalog file extending the packaged one")
    show.add_argument("--format", choices=("text", "json", "markdown"), default="text",
                      help="output format (default text; markdown: the README's catalog tables, every model)")
    show.set_defaults(run=run_show)
    check = verbs.add_parser("check", help="validate a user catalog file",
                             description="Validate a catalog file merged onto the packaged one (or alone with "
                                         "--replace); errors at file:line:col with hints. Exit 1 on errors.")
    check.add_argument("file", metavar="FILE", help="catalog file")
    check.add_argument("--replace", action="store_true", help="the file is the whole catalog (no packaged models)")
    check.set_defaults(run=run_check)
    diff = verbs.add_parser("diff", help="what changed between two catalogs, and what it costs",
                            description="List price and fast-availability changes between OLD and NEW (files, or "
                                        "`packaged`); with --requests LOG and --policy FILE, replay the log under both "
                                        "and report the cost change.")
    diff.add_argument("old", metavar="OLD", help="old catalog file, or `packaged`")
    diff.add_argument("new", metavar="NEW", help="new catalog file, or `packaged`")
    diff.add_argument("--platform", default="claude_api", help="platform to compare (default claude_api)")
    diff.add_argument("--at", metavar="DATE", help="date for fast availability (YYYY-MM-DD; default today)")
    diff.add_argument("--requests", metavar="LOG", help="request log to replay under both catalogs")
    diff.add_argument("--policy", metavar="FILE", default=None, help="policy for the replay (default policies/default.yaml)")
    diff.add_argument("--format", choices=("text", "json"), default="text", help="output format (default text)")
    diff.set_defaults(run=run_diff)
    p.set_defaults(run=lambda args: _usage(p))


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def _at(text: str | None) -> float:
    if text is None:
        return datetime.now(timezone.utc).timestamp()
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--at must be a date (YYYY-MM-DD), not {text!r}") from None
    return datetime(day.year, day.month, day.day, 12, tzinfo=timezone.utc).timestamp()


def _load(spec: str | None, *, extend: bool = True) -> Any:
    from ..catalog import load_catalog

    if spec is None or spec == PACKAGED:
        return load_catalog()
    try:
        with open(spec, "rb"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot read catalog {spec}: {exc.strerror or exc}") from None
    return load_catalog(spec, extend=extend)


def _platform(catalog: Any, platform: str) -> None:
    from ..catalog import PLATFORMS

    if platform not in PLATFORMS:
        raise UsageError(f"unknown platform {platform!r}; expected one of {', '.join(PLATFORMS)}")


# -- show -------------------------------------------------------------------------------------


def _sourced(block: Any) -> dict[str, Any]:
    return {"source": block.source, "as_of": str(block.as_of) if block.as_of else None,
            "source_kind": block.source_kind, **({"conflicts": list(block.conflicts)} if getattr(block, "conflicts", None) else {})}


def _per_mtok(pico_per_token: int) -> str:
    value = pico_per_token / 1_000_000
    return f"${value:g}"


def describe(entry: Any, at: float) -> dict[str, Any]:
    """A model's effective entry, every figure with its provenance (JSON-ready)."""
    state, why = entry.fast.status(at)
    fast = entry.fast
    out: dict[str, Any] = {
        "id": entry.id, "platform": entry.platform, "wire_id": entry.wire_id, "display_name": entry.display_name,
        "family": entry.family, "context_window": entry.context_window, "max_output_tokens": entry.max_output_tokens,
        "fast": {"state": state, "why": why or None, "supported": fast.supported, "beta_header": fast.beta_header,
                 "available_from": str(fast.available_from) if fast.available_from else None,
                 "retired_on": str(fast.retired_on) if fast.retired_on else None,
                 "after_retirement": fast.after_retirement, "fast_model_id": entry.fast_model_id, "quota": fast.quota,
                 "source": fast.source, "as_of": str(fast.as_of) if fast.as_of else None, "source_kind": fast.source_kind,
                 "retirement_source": fast.retirement_source},
    }
    if entry.standard is not None:
        out["standard"] = {"tiers": [{"above_input_tokens": t.above_input_tokens, "input": str(t.input),
                                      "output": str(t.output)} for t in entry.standard.tiers], **_sourced(entry.standard)}
    else:
        out["standard"] = None
    pricing = fast.pricing
    if pricing is not None:
        out["fast"]["pricing"] = {"multiplier": str(pricing.multiplier) if pricing.multiplier is not None else None,
                                  "tiers": [{"above_input_tokens": t.above_input_tokens, "input": str(t.input),
                                             "output": str(t.output)} for t in pricing.tiers or []] or None,
                                  **_sourced(pricing)}
    for name in ("cache", "data_residency", "batch"):
        block = getattr(entry, name)
        out[name] = None if block is None else {**block.model_dump(mode="json", exclude={"source", "as_of", "source_kind",
                                                                                         "conflicts"}), **_sourced(block)}
    rates: dict[str, Any] = {}
    for speed in ("standard", "fast"):
        try:
            table = entry.rate_table(speed)
        except Exception as exc:  # PricingError: say why, as the engine would
            rates[speed] = str(exc)
            continue
        rates[speed] = [{"above_input_tokens": above, "input": _per_mtok(c.input), "output": _per_mtok(c.output),
                         "cache_write_5m": _per_mtok(c.cache_write_5m), "cache_write_1h": _per_mtok(c.cache_write_1h),
                         "cache_read": _per_mtok(c.cache_read)} for above, c in reversed(table)]
    out["rates_per_mtok"] = rates
    return out


def _text(d: dict[str, Any]) -> str:
    lines = [f"{d['id']} ({d['display_name'] or d['id']}) on {d['platform']}"
             + (f", sent as {d['wire_id']}" if d["wire_id"] != d["id"] else "")]
    fast = d["fast"]
    state = {"available": "fast mode available", "unsupported": "no fast mode", "not_yet": "fast mode not yet available",
             "retired_error": "fast mode retired (requests error)",
             "retired_standard": "fast mode retired (served at standard)"}[fast["state"]]
    beta = f"beta header {fast['beta_header']}" if fast["beta_header"] else "no beta header"
    if fast["fast_model_id"]:
        beta = f"fast model id {fast['fast_model_id']}, no speed field"
    lines.append(f"  fast: {state}" + (f"; {beta}" if fast["supported"] else ""))
    if fast["available_from"] or fast["retired_on"]:
        lines.append(f"    window: from {fast['available_from'] or '(unknown)'} to {fast['retired_on'] or '(no retirement known)'}"
                     + (f", then {fast['after_retirement']}" if fast["after_retirement"] else ""))
    lines.append(f"    source: {fast['source']} (as of {fast['as_of']}, {fast['source_kind'] or 'unrated'})")
    if fast["retirement_source"]:
        lines.append(f"    retirement: {fast['retirement_source']}")
    if fast.get("quota"):
        lines.append(f"    quota: {fast['quota']}")

    def block(name: str, data: dict[str, Any] | None, figures: str) -> None:
        if data is None:
            lines.append(f"  {name}: unknown (no source gives it)")
            return
        lines.append(f"  {name}: {figures}")
        lines.append(f"    source: {data['source']} (as of {data['as_of']}, {data['source_kind'] or 'unrated'})")
        for conflict in data.get("conflicts", []):
            lines.append(f"    conflict: {conflict}")

    std = d["standard"]
    block("standard", std, ", ".join(f"above {t['above_input_tokens']}: ${t['input']} in / ${t['output']} out"
                                     for t in std["tiers"]) if std else "")
    pricing = fast.get("pricing")
    if fast["supported"]:
        block("fast price", pricing, (f"{pricing['multiplier']}x standard, over the full context, cache included"
                                      if pricing and pricing["multiplier"] else
                                      ", ".join(f"above {t['above_input_tokens']}: ${t['input']} in / ${t['output']} out"
                                                for t in (pricing or {}).get("tiers") or [])))
    cache = d["cache"]
    block("cache", cache, f"5m write {cache['write_5m']}x, 1h write {cache['write_1h']}x, read {cache['read']}x input"
          if cache else "")
    geo = d["data_residency"]
    block("data residency", geo, ", ".join(f"{k} {v}x" for k, v in geo["multipliers"].items()) if geo else "")
    batch = d["batch"]
    block("batch", batch, f"{float(batch['discount']) * 100:g}% off standard" if batch else "")
    for speed, table in d["rates_per_mtok"].items():
        if isinstance(table, str):
            lines.append(f"  {speed} rates: {table}")
            continue
        for tier in table:
            lines.append(f"  {speed} rates above {tier['above_input_tokens']} tokens: {tier['input']} in, {tier['output']} out, "
                         f"{tier['cache_write_5m']} / {tier['cache_write_1h']} cache writes, {tier['cache_read']} cache read "
                         "(per MTok, platform multiplier applied)")
    return "\n".join(lines)


def run_show(args: argparse.Namespace) -> int:
    from ..errors import PricingError

    catalog = _load(args.catalog)
    _platform(catalog, args.platform)
    at = _at(args.at)
    if args.model is not None:
        try:
            entries = [catalog.model(args.model, platform=args.platform)]
        except PricingError as exc:
            raise UsageError(str(exc)) from None
    else:
        entries = sorted({id(e): e for e in catalog.__pydantic_private__["_offers"][("anthropic", args.platform)].values()}
                         .values(), key=lambda e: e.id)
    if args.format == "markdown":
        print(reference_markdown(catalog), end="")
        return EXIT_OK
    described = [describe(e, at) for e in entries]
    if args.format == "json":
        print(json.dumps(described[0] if args.model else described, indent=2))
    else:
        print("\n\n".join(_text(d) for d in described))
    return EXIT_OK


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _source_cells(block: Any) -> str:
    kind = block.source_kind or "unrated"
    extra = "".join(f"<br>conflict: {_cell(c)}" for c in getattr(block, "conflicts", []) or [])
    return f"{_cell(block.source)} ({block.as_of}) | {kind}{extra}"


def _tiers(tiers: Any) -> str:
    return "; ".join(f"${t.input} / ${t.output}" + (f" above {t.above_input_tokens:,} tokens" if t.above_input_tokens else "")
                     for t in tiers)


def _fast_cell(fast: Any, fast_model_id: str | None) -> str:
    if not fast.supported:
        return "no fast mode"
    how = f"as `{fast_model_id}`, no `speed`" if fast_model_id else (f"beta `{fast.beta_header}`" if fast.beta_header
                                                                      else "no beta header")
    window = f"from {fast.available_from}" if fast.available_from else ""
    if fast.retired_on:
        window += f"{' ' if window else ''}until {fast.retired_on}, then {fast.after_retirement}"
    return how + (f"; {window}" if window else "")


def reference_markdown(catalog: Any) -> str:
    """The README's catalog tables: every model's figures, then every platform's offers, each with its
    source and source_kind (generated, so the README cannot drift from the packaged catalog)."""
    rows = ["| model | figure | value | source (as of) | kind |", "|---|---|---|---|---|"]
    models = catalog.providers["anthropic"].models
    for model_id, entry in models.items():
        first = f"`{model_id}`"

        def add(figure: str, value: str, block: Any) -> None:
            nonlocal first
            sourced = _source_cells(block) if block is not None and getattr(block, "source", None) else "— | —"
            rows.append(f"| {first} | {figure} | {_cell(value)} | {sourced} |")
            first = ""

        add("fast mode", _fast_cell(entry.fast, None), entry.fast)
        if entry.fast.retired_on and entry.fast.retirement_source:
            rows.append(f"|  | retirement | {entry.fast.retired_on}: {entry.fast.after_retirement} | "
                        f"{_cell(entry.fast.retirement_source)} | {entry.fast.source_kind or 'unrated'} |")
        if entry.standard is None:
            add("standard", "unknown: no source gives it", None)
        else:
            add("standard in / out per MTok", _tiers(entry.standard.tiers), entry.standard)
        pricing = entry.fast.pricing
        if entry.fast.supported:
            if pricing is None:
                add("fast price", "unknown: no source gives it", None)
            else:
                value = (f"{pricing.multiplier}x standard, full context, cache included" if pricing.multiplier is not None
                         else _tiers(pricing.tiers))
                add("fast price", value, pricing)
        if entry.cache is not None:
            c = entry.cache
            add("cache 5m / 1h / read", f"{c.write_5m}x / {c.write_1h}x / {c.read}x input", c)
        if entry.data_residency is not None:
            add("inference_geo", ", ".join(f"{k} {v}x" for k, v in entry.data_residency.multipliers.items()),
                entry.data_residency)
        if entry.batch is not None:
            add("Batch API", f"{float(entry.batch.discount) * 100:g}% off", entry.batch)
    rows += ["", "| platform | how fast is asked | price multiplier | models offered (id there; fast) | source (as of) | kind |",
             "|---|---|---|---|---|---|"]
    for platform_id, platform in catalog.platforms.items():
        offers = catalog.__pydantic_private__["_offers"][("anthropic", platform_id)]
        listed = {e.id: e for e in offers.values()}
        if platform.all_models:
            models_cell = "every model, under its Claude API id" + ("; no fast mode" if not platform.fast_mode else "")
        else:
            models_cell = "; ".join(f"`{e.wire_id}`" + (f": {_fast_cell(e.fast, e.fast_model_id)}" if e.fast.supported else "")
                                    for e in listed.values())
        how = "separate `-fast` model id" if platform.fast_request == "model_id" else "`speed: \"fast\"`"
        if not platform.fast_mode:
            how = "no fast mode"
        rows.append(f"| `{platform_id}` ({platform.display_name}) | {how} | {platform.price_multiplier}x | {_cell(models_cell)} | "
                    f"{_cell(platform.source)} ({platform.as_of}) | {platform.source_kind or 'unrated'} |")
    return "\n".join(rows) + "\n"


# -- check ------------------------------------------------------------------------------------


def run_check(args: argparse.Namespace) -> int:
    from ..errors import PolicyError

    try:
        catalog = _load(args.file, extend=not args.replace)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return EXIT_FINDINGS
    models = sum(len(p.models) for p in catalog.providers.values())
    print(f"{args.file}: ok ({models} models, {len(catalog.platforms)} platforms)")
    return EXIT_OK


# -- diff -------------------------------------------------------------------------------------


def _figures(entry: Any, at: float) -> dict[str, str]:
    """What `diff` compares of one model: fast state and header, and the rates per MTok."""
    d = describe(entry, at)
    figures = {"fast": d["fast"]["state"], "beta header": d["fast"]["beta_header"] or "none",
               "fast window": f"{d['fast']['available_from'] or '-'}..{d['fast']['retired_on'] or '-'}"}
    for speed, table in d["rates_per_mtok"].items():
        if isinstance(table, str):
            figures[f"{speed} price"] = "unknown"
            continue
        figures[f"{speed} price"] = "; ".join(f"{t['input']}/{t['output']}" + (f" above {t['above_input_tokens']}"
                                                                                if t["above_input_tokens"] else "")
                                              for t in table)
        figures[f"{speed} cache"] = "; ".join(f"{t['cache_write_5m']}/{t['cache_write_1h']}/{t['cache_read']}" for t in table)
    return figures


def catalog_changes(old: Any, new: Any, platform: str, at: float) -> list[dict[str, str]]:
    """Every figure that differs between two catalogs, model by model (added and removed models too)."""
    def index(catalog: Any) -> dict[str, Any]:
        offers = catalog.__pydantic_private__["_offers"].get(("anthropic", platform), {})
        return {e.id: e for e in offers.values()}

    before, after = index(old), index(new)
    changes = []
    for model in sorted(before.keys() | after.keys()):
        if model not in after:
            changes.append({"model": model, "figure": "model", "old": "listed", "new": "removed"})
            continue
        if model not in before:
            changes.append({"model": model, "figure": "model", "old": "absent", "new": "added"})
            continue
        a, b = _figures(before[model], at), _figures(after[model], at)
        for figure in a.keys() | b.keys():
            if a.get(figure) != b.get(figure):
                changes.append({"model": model, "figure": figure, "old": a.get(figure, "-"), "new": b.get(figure, "-")})
    return sorted(changes, key=lambda c: (c["model"], c["figure"]))


def run_diff(args: argparse.Namespace) -> int:
    from pathlib import Path

    old, new = _load(args.old), _load(args.new)
    _platform(old, args.platform)
    changes = catalog_changes(old, new, args.platform, _at(args.at))
    replay: dict[str, Any] | None = None
    if args.requests:
        replay = _replay(args.policy, args.requests, old, new)
    elif args.policy:
        raise UsageError("--policy goes with --requests")
    if args.format == "json":
        print(json.dumps({"changes": changes, "replay": replay}, indent=2))
        return EXIT_OK
    print(f"catalog diff {args.old} -> {args.new} on {args.platform}: {len(changes)} change"
          + ("" if len(changes) == 1 else "s"))
    for c in changes:
        print(f"  {c['model']}: {c['figure']}: {c['old']} -> {c['new']}")
    if replay is not None:
        print(f"replay of {replay['requests']} with {Path(replay['policy']).name}: {replay['lines']} lines")
        print(f"  cost {replay['old_cost']} -> {replay['new_cost']} ({replay['cost_change']}); "
              f"fast {replay['old_fast']} -> {replay['new_fast']} requests; "
              f"unpriced {replay['old_unpriced']} -> {replay['new_unpriced']}")
    return EXIT_OK


def _replay(policy: str | None, requests: str, old: Any, new: Any) -> dict[str, Any]:
    """The same log replayed under both catalogs (the existing simulate replay)."""
    from ..compile import compile_file
    from ..simulate import Replayer, _money, iter_log, open_log

    path = policy or str(_default_policy())
    compiled = compile_file(path)
    reports = []
    for catalog in (old, new):
        with open_log(requests) as stream:
            reports.append(Replayer(compiled, catalog).run(iter_log(stream)))
    a, b = reports
    delta = b.cost - a.cost
    return {"policy": path, "requests": requests, "lines": a.lines, "old_cost": _money(a.cost), "new_cost": _money(b.cost),
            "cost_change": ("+" if delta >= 0 else "-") + _money(abs(delta)), "cost_change_micro": delta,
            "old_fast": a.speeds["fast"], "new_fast": b.speeds["fast"], "old_unpriced": a.unpriced, "new_unpriced": b.unpriced}


def _default_policy() -> Any:
    from pathlib import Path

    here = Path.cwd() / "policies" / "default.yaml"
    if not here.exists():
        raise UsageError("--requests needs --policy FILE (no policies/default.yaml here)")
    return here
