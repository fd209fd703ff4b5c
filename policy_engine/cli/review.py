"""`policy-engine review`: the cost review of a pull request, as examples/policy-ci.yml posts it.

It finds the policy files a branch changes against its base (git's NUL-separated output, so
no file name is ever split or globbed), replays the request log through the base and the
branch version of each, and writes one markdown comment (`diff` and `simulate` of every
changed policy, with their charts) that stays under GitHub's comment limit, plus, on
request, the full markdown for the job summary and an HTML page per report.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import PolicyError
from . import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE, UsageError

MARKER = "<!-- policy-engine-review -->"
"""First line of the comment: how the workflow finds its earlier comment to update it."""
COMMENT_LIMIT = 65_536
"""GitHub's limit on a comment body, in characters. The review counts UTF-8 bytes, which are never
fewer than characters or UTF-16 code units, so the body fits however GitHub counts."""
SUMMARY_LIMIT = 1_000_000
"""A job summary may hold 1 MiB; a little under it."""


@dataclass
class _Section:
    title: str
    text: str


def setup_review(p: argparse.ArgumentParser) -> None:
    """Review the policy changes of a branch: the cost comment of a pull request.

    Lists the policy files that changed between the merge base of BASE and HEAD (added or
    modified; *_test.yaml files and deletions are skipped), replays the request log through
    the base and the new version of each (`diff`), and through the new one alone
    (`simulate`), and writes the markdown to --output (default stdout): a first line
    `<!-- policy-engine-review -->` for finding the comment again, then whole sections
    while they fit in --max-bytes (default 65,536, GitHub's comment limit), and a note
    naming what was left out. --summary appends everything (for $GITHUB_STEP_SUMMARY);
    --html-dir writes each report as an HTML page (needs the `report` extra). Exit 0 when
    every changed policy was replayed (whatever it costs: thresholds belong to `diff`), 1
    when one could not be compiled or replayed, 2 on usage errors (no git, unknown BASE)."""
    p.add_argument("--base", required=True, metavar="REV", help="the base branch, e.g. origin/main")
    p.add_argument("--requests", required=True, metavar="LOG", help="request log (.jsonl or .jsonl.gz)")
    p.add_argument("--paths", nargs="+", default=["policies"], metavar="PATH",
                   help="where the policies live, relative to the repository root (default: policies)")
    p.add_argument("--output", metavar="FILE", help="write the comment here (default stdout)")
    p.add_argument("--summary", metavar="FILE", help="append the full review here, e.g. $GITHUB_STEP_SUMMARY")
    p.add_argument("--html-dir", metavar="DIR", help="write an HTML page per report into DIR")
    p.add_argument("--reports-url", metavar="URL", help="where readers find the HTML pages (e.g. the run's artifacts)")
    p.add_argument("--max-bytes", type=int, default=COMMENT_LIMIT, metavar="N",
                   help=f"size limit of the comment in UTF-8 bytes (default {COMMENT_LIMIT})")
    from .commands import _add_catalog

    _add_catalog(p)
    p.set_defaults(run=run_review)


def _git(*args: str, cwd: str | None = None) -> str:
    try:
        done = subprocess.run(["git", *args], capture_output=True, check=False, timeout=120, cwd=cwd)
    except (OSError, subprocess.SubprocessError) as exc:
        raise UsageError(f"cannot run git: {exc}") from None
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip() or f"git {args[0]} failed"
        raise UsageError(f"git {' '.join(args[:2])}: {message}")
    return done.stdout.decode("utf-8", "surrogateescape")


def changed_policies(base: str, paths: list[str]) -> tuple[str, str, list[str]]:
    """(repository root, merge base, changed policy files relative to the root, in git's order)."""
    root = _git("rev-parse", "--show-toplevel").strip()
    try:
        merge_base = _git("merge-base", base, "HEAD", cwd=root).strip()
    except UsageError as exc:
        raise UsageError(f"{exc}\nhint: the base must be fetched; in GitHub Actions, check out with fetch-depth: 0") from None
    # -z: names NUL-terminated and unquoted; --literal-pathspecs: a path is a path, never a glob;
    # --no-renames: a renamed policy is a new one (its old name is not under review).
    listing = _git("--literal-pathspecs", "diff", "--name-only", "-z", "--no-renames", "--diff-filter=AMT",
                   merge_base, "HEAD", "--", *paths, cwd=root)
    files = [name for name in listing.split("\0") if name]
    policies = [f for f in files if f.endswith((".yaml", ".yml")) and not f.endswith(("_test.yaml", "_test.yml"))]
    return root, merge_base, policies


def fit(sections: list[_Section], limit: int, reports_url: str | None = None) -> str:
    """MARKER, then whole sections while they fit in `limit` UTF-8 bytes, then a note of those left out."""
    head = f"{MARKER}\n## Policy cost review\n\n"
    kept: list[str] = []
    used = len(head.encode("utf-8"))
    reserve = 600  # the note naming what was left out
    omitted: list[str] = []
    for section in sections:
        size = len(section.text.encode("utf-8"))
        if not omitted and used + size + reserve <= limit:
            kept.append(section.text)
            used += size
        else:
            omitted.append(section.title)
    body = head + "\n".join(kept)
    if omitted:
        names = ", ".join(omitted)
        note = (f"\n> {len(omitted)} more report(s) did not fit in this comment: "
                f"{names[:300]}{'…' if len(names) > 300 else ''}."
                + (f" All of them: {reports_url}" if reports_url else " All of them are in the job summary.") + "\n")
        body += note
    if len(body.encode("utf-8")) > limit:  # only a tiny limit gets here
        body = body.encode("utf-8")[:limit].decode("utf-8", "ignore")
    return body


def _slug(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path).strip("_") or "policy"


def run_review(args: argparse.Namespace) -> int:
    from ..report import diff_markdown, render_diff, render_simulate, replay_diff, replay_simulate, simulate_markdown
    from ..simulate import iter_log
    from .commands import _catalog, _compiled, _open_requests, _report_available

    if args.max_bytes < 1024:
        raise UsageError("--max-bytes must be at least 1024")
    if args.requests == "-":
        raise UsageError("--requests must be a file: the log is read once per changed policy")
    if args.html_dir:
        _report_available("html")
    requests = os.path.abspath(args.requests)
    if not os.path.isfile(requests):
        raise UsageError(f"no such file: {args.requests}")
    catalog = _catalog(args)
    root, merge_base, policies = changed_policies(args.base, args.paths)
    html_dir = Path(args.html_dir) if args.html_dir else None
    if html_dir is not None:
        html_dir.mkdir(parents=True, exist_ok=True)
    sections: list[_Section] = []
    status = EXIT_OK
    partial = False
    for path in policies:
        title = f"`{path}`"
        try:
            new = _compiled(os.path.join(root, path))
            in_base = subprocess.run(["git", "cat-file", "-e", f"{merge_base}:{path}"], cwd=root,
                                     capture_output=True, check=False).returncode == 0
            old = _compiled(f"{merge_base}:{path}") if in_base else None
        except PolicyError as exc:
            status = EXIT_FINDINGS
            sections.append(_Section(title, f"### {title} does not compile\n\n```\n{exc.format()}\n```\n"))
            continue
        with _open_requests(requests) as stream:
            if old is not None:
                result, timeline_old, timeline = replay_diff(old, new, iter_log(stream), catalog)
                report = result.new
                sections.append(_Section(f"{title} (diff)", f"#### {title}\n\n" + diff_markdown(result, timeline_old, timeline)))
            else:
                report, timeline = replay_simulate(new, iter_log(stream), catalog)
                result = None
        if report.stopped is not None:
            # A partial replay must not pass for a review of the whole log.
            print(f"policy-engine review: {path}: the log could not be read to its end: {report.stopped}", file=sys.stderr)
            partial = True
        heading = "" if old is not None else f"#### {title} (new policy)\n\n"  # a diff section heads it otherwise
        sections.append(_Section(f"{title} (simulate)", heading + simulate_markdown(report, timeline)))
        if html_dir is not None:
            slug = _slug(path)
            if result is not None:
                (html_dir / f"{slug}.diff.html").write_text(render_diff(result, timeline_old, timeline), encoding="utf-8")
            (html_dir / f"{slug}.simulate.html").write_text(render_simulate(report, timeline), encoding="utf-8")
    if not policies:
        sections.append(_Section("no changes", f"No policy file under {', '.join(f'`{p}`' for p in args.paths)} changes "
                                               f"against `{args.base}`.\n"))
    elif args.reports_url:
        sections.insert(0, _Section("charts", f"Charts of every report: {args.reports_url}\n"))
    comment = fit(sections, args.max_bytes, args.reports_url)
    if args.output:
        Path(args.output).write_text(comment, encoding="utf-8")
    else:
        print(comment, end="")
    if args.summary:
        with open(args.summary, "a", encoding="utf-8") as summary:
            summary.write(fit(sections, SUMMARY_LIMIT, args.reports_url))
    return EXIT_USAGE if partial else status
