#!/usr/bin/env python3
"""Generate tests/data/tokens/corpus.jsonl: requests with proxy reference token counts.

Run ONCE (the output is committed; the tests never need a tokenizer):

    python -m venv /tmp/tokvenv && /tmp/tokvenv/bin/pip install tokenizers
    pip download --no-deps -d /tmp/a038 anthropic==0.38.0
    unzip -o /tmp/a038/anthropic-0.38.0-py3-none-any.whl anthropic/tokenizer.json -d /tmp/a038
    /tmp/tokvenv/bin/python scripts/make_token_fixtures.py --tokenizer-json /tmp/a038/anthropic/tokenizer.json

Reference tokenizer
-------------------
The ``tokenizer.json`` that the ``anthropic`` Python SDK shipped up to 0.38.x (a
65,000-entry byte-level BPE, NFKC-normalized; the legacy Claude tokenizer). The
``anthropic-tokenizer`` package on PyPI embeds byte-for-byte the same file in its
Rust extension, so it adds nothing. Anthropic has never published the tokenizer
of Claude 3 / 4 models: these counts are a PROXY, not the counts
``/v1/messages/count_tokens`` returns for Opus 4.6.

How a request is counted (the proxy "rendering")
------------------------------------------------
The tokenizer sees one string: the tool definitions (one JSON object per tool:
name, description, input_schema), the system prompt, then each message as
``"\\n\\nHuman: "`` / ``"\\n\\nAssistant: "`` + its content (text as is, tool_use as
the JSON of ``{"name", "input"}``, tool_result as its text, thinking as its text),
then ``"\\n\\nAssistant:"``. To that count we add the tool-use system prompt that
Anthropic documents for Claude 4 models when tools are present: 346 tokens for
tool_choice auto/none, 313 for any/tool. Images and documents are not in the
corpus (their cost is formula-based and tested by unit tests).

Every text in the corpus is written for this file or generated from word lists
here (seeded, deterministic); no third-party text.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import string
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "tokens" / "corpus.jsonl"
MODEL = "claude-opus-4-6"
TOOL_PROMPT = {"auto": 346, "none": 346, "any": 313, "tool": 313}

# --------------------------------------------------------------------------- texts

PROSE = [
    "The budget service reserves the worst-case cost of a request before it is sent, then settles the "
    "reservation against the usage the API reports. If the estimate is too low, a burst of parallel "
    "requests can overspend the daily limit before any of them completes.",
    "Our quarterly review found that most of the latency came from a single slow dependency. After we "
    "moved the lookup behind a cache with a five-minute lifetime, the ninety-fifth percentile dropped "
    "from 840 milliseconds to 120 milliseconds, and the error rate fell by half.",
    "Please summarize the attached meeting notes in three bullet points, highlighting any decisions "
    "that were made and the owners of the follow-up tasks. Keep it under one hundred words.",
    "When the river flooded in the spring, the farmers on the lower fields moved their animals to the "
    "old stone barn on the hill. Nobody remembered who had built it, but everybody agreed it had never "
    "once let water through its doors.",
    "I'm not sure I understand the difference between a mutex and a semaphore. Could you explain it "
    "with a small example, and tell me when I should prefer one over the other?",
    "Fast mode trades a higher price per token for lower latency. It makes sense for interactive "
    "sessions where a person is waiting, and rarely for batch jobs that run overnight.",
    "Dear team, the office will be closed on Monday for maintenance of the heating system. Remote work "
    "is expected as usual; the on-call rotation does not change. Thanks for your patience!",
    "She opened the letter slowly, as if the words inside might escape if she hurried. It was short: "
    "three lines, no signature, and a pressed blue flower that crumbled when she touched it.",
    "Write a haiku about debugging a race condition at three in the morning.",
    "The committee recommends adopting the proposal with two amendments: first, that the pilot be "
    "limited to four regions; second, that an independent auditor review the results after six months.",
    "Photosynthesis converts light energy into chemical energy stored in glucose. It happens mainly in "
    "the chloroplasts of leaf cells, where chlorophyll absorbs red and blue light and reflects green.",
    "Can you help me plan a four-day trip with two kids who love trains, museums and pancakes? We don't "
    "have a car, and we'd like to avoid more than two hours of travel per day.",
]

WORDS = (
    "the of and to in a is that for it as with was on be by at this from are or an have not which but "
    "all they were their has one been more there when will would can if no other into some could them "
    "than then these only its over also after use two how our work first well way even new want because "
    "any give day most us system request budget cost token model latency policy service customer report "
    "quarter engineer design review estimate reserve limit window cache server client response error "
    "network storage database schema migration release version feature customer invoice payment account "
    "history river mountain garden kitchen window morning evening winter summer journey letter story "
    "question answer problem solution example reason result decision meeting schedule deadline priority "
    "performance reliability availability throughput concurrency parallel sequential configuration "
    "deployment infrastructure observability authentication authorization encryption certificate "
    "approximately significantly unfortunately nevertheless furthermore consequently immediately "
    "extraordinary misunderstanding responsibilities internationalization characteristics "
    "quick brown fox lazy dog happy careful quiet bright heavy simple complex ancient modern gentle "
    "runs writes reads builds tests breaks fixes measures ships checks waits sends receives returns"
).split()

CODE = [
    '''def reserve(budget: Budget, estimate: Decimal) -> Reservation:
    """Reserve `estimate` against `budget`, or raise CeilingExceeded."""
    with budget.lock:
        if budget.spent + budget.reserved + estimate > budget.limit:
            raise CeilingExceeded(budget.name, str(budget.limit), str(budget.spent), str(estimate))
        budget.reserved += estimate
        return Reservation(budget=budget, amount=estimate, created=time.monotonic())
''',
    '''import { useEffect, useState } from "react";

export function useDebounced<T>(value: T, delayMs = 250): T {
  const [debounced, setDebounced] = useState(value);
  useEffect(() => {
    const id = setTimeout(() => setDebounced(value), delayMs);
    return () => clearTimeout(id);
  }, [value, delayMs]);
  return debounced;
}
''',
    '''SELECT c.id, c.name, SUM(i.amount_cents) / 100.0 AS total_usd
FROM customers AS c
JOIN invoices AS i ON i.customer_id = c.id
WHERE i.issued_at >= DATE '2025-01-01' AND i.status IN ('paid', 'partial')
GROUP BY c.id, c.name
HAVING SUM(i.amount_cents) > 100000
ORDER BY total_usd DESC
LIMIT 50;
''',
    '''fn parse_header(buf: &[u8]) -> Result<(u32, u32), ParseError> {
    if buf.len() < 24 || &buf[..8] != b"\\x89PNG\\r\\n\\x1a\\n" {
        return Err(ParseError::NotPng);
    }
    let w = u32::from_be_bytes(buf[16..20].try_into()?);
    let h = u32::from_be_bytes(buf[20..24].try_into()?);
    Ok((w, h))
}
''',
    '''#!/usr/bin/env bash
set -euo pipefail
for f in "$@"; do
  if [[ -f "$f" ]]; then
    sha256sum "$f" | awk '{print $1}' > "${f}.sha256"
  else
    echo "skip: $f is not a file" >&2
  fi
done
''',
    '''package main

import (
\t"fmt"
\t"net/http"
\t"time"
)

func main() {
\tclient := &http.Client{Timeout: 2 * time.Second}
\tresp, err := client.Get("http://127.0.0.1:8080/healthz")
\tif err != nil {
\t\tfmt.Println("down:", err)
\t\treturn
\t}
\tdefer resp.Body.Close()
\tfmt.Println("status", resp.StatusCode)
}
''',
    '''<!doctype html>
<html lang="en">
  <head><meta charset="utf-8"><title>Budget dashboard</title>
    <style>.over { color: #b00020; font-weight: 600; } table { border-collapse: collapse; }</style>
  </head>
  <body>
    <table id="budgets"><tr><th>Name</th><th>Spent</th><th>Limit</th></tr></table>
    <script src="/static/app.js" defer></script>
  </body>
</html>
''',
    '''class LRU:
    def __init__(self, size=128):
        self.size, self.data = size, OrderedDict()
    def get(self, k):
        if k in self.data:
            self.data.move_to_end(k)
            return self.data[k]
    def put(self, k, v):
        self.data[k] = v; self.data.move_to_end(k)
        while len(self.data) > self.size:
            self.data.popitem(last=False)
''',
]

CJK = [
    "今日は天気がいいので、公園を散歩しながら新しいプロジェクトの計画を考えました。",
    "このリクエストの予算は一日あたり五十ドルまでに制限されています。",
    "申し訳ありませんが、そのファイルは見つかりませんでした。もう一度お試しください。",
    "我们需要在发送请求之前估算令牌数量，以便预留足够的预算。",
    "这个服务在高峰时段的延迟明显增加，请检查缓存配置是否正确。",
    "请用三句话总结这篇文章的主要观点，并列出作者提出的两个建议。",
    "春天来了，山上的花都开了，孩子们在河边放风筝。",
    "오늘 회의에서 다음 분기의 예산 계획을 논의했습니다.",
    "요청이 실패하면 예상 토큰 수를 기준으로 다시 시도합니다.",
    "東京から大阪までは新幹線で約二時間半かかります。",
    "用户反馈说界面加载太慢，我们计划在下个版本中优化图片压缩。",
    "データベースの移行は週末に実施し、月曜日の朝までに完了する予定です。",
]

OTHER_LANG = [
    "Le service réserve le coût maximal de chaque requête avant de l'envoyer à l'API.",
    "Die Anfrage wurde abgelehnt, weil das tägliche Budget bereits überschritten wurde.",
    "¿Podrías explicarme cómo funciona la caché y cuándo debería invalidarla?",
    "Запрос был отклонён, потому что дневной бюджет уже исчерпан.",
    "Пожалуйста, проверьте настройки кэша и повторите попытку через пять минут.",
    "الرجاء التحقق من إعدادات الميزانية قبل إرسال الطلب التالي.",
    "कृपया अगले अनुरोध से पहले बजट सेटिंग्स की जाँच करें।",
    "Η αίτηση απορρίφθηκε επειδή ξεπεράστηκε το ημερήσιο όριο.",
    "Yêu cầu đã bị từ chối vì ngân sách hằng ngày đã hết.",
    "Lütfen bir sonraki istekten önce bütçe ayarlarını kontrol edin.",
    "Proszę sprawdzić ustawienia budżetu przed wysłaniem kolejnego żądania.",
    "Bitte prüfen Sie die Einstellungen, bevor Sie die nächste Anfrage senden. Grüße aus München!",
]

SHORT = ["hi", "ok", "?", "Thanks!", "yes", "no", "42", "Continue.", "What time is it?", "👍",
         "Hello, world", "Go on", "Why?", "lol", "3.14159", "", " ", "\n", "Translate to French: cat",
         "continue", "Summarize.", "🙂🙂", "你好", "ありがとう"]

TOOLS = [
    {"name": "get_weather", "description": "Get the current weather in a given location.",
     "input_schema": {"type": "object", "properties": {
         "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"}},
         "required": ["location"]}},
    {"name": "search_orders", "description": "Search the customer's orders by status, date range and free text. "
     "Returns at most `limit` orders, newest first.",
     "input_schema": {"type": "object", "properties": {
         "status": {"type": "string", "enum": ["open", "shipped", "delivered", "cancelled"]},
         "since": {"type": "string", "format": "date"}, "until": {"type": "string", "format": "date"},
         "query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1, "maximum": 100}},
         "required": []}},
    {"name": "run_sql", "description": "Run a read-only SQL query against the analytics warehouse.",
     "input_schema": {"type": "object", "properties": {"sql": {"type": "string"}}, "required": ["sql"]}},
    {"name": "create_ticket", "description": "Open a support ticket. Use only after confirming the problem "
     "with the user; include reproduction steps when known.",
     "input_schema": {"type": "object", "properties": {
         "title": {"type": "string", "maxLength": 120}, "body": {"type": "string"},
         "priority": {"type": "string", "enum": ["low", "normal", "high", "urgent"]},
         "labels": {"type": "array", "items": {"type": "string"}}}, "required": ["title", "body"]}},
]

SYSTEMS = [
    "You are a helpful assistant.",
    "You are a concise support agent for an online store. Answer in at most three sentences. Never "
    "promise refunds; offer to open a ticket instead.",
    "You are a senior Python reviewer. Point out bugs first, then style issues. Quote the exact line.",
    "Respond only in Spanish.",
    "あなたは丁寧な日本語で答えるアシスタントです。",
]


def gen_prose(rng: random.Random, n_words: int) -> str:
    out: list[str] = []
    sentence: list[str] = []
    for _ in range(n_words):
        w = rng.choice(WORDS)
        if not sentence:
            w = w.capitalize()
        sentence.append(w)
        if len(sentence) > rng.randint(6, 22):
            out.append(" ".join(sentence) + rng.choice([".", ".", ".", "?", "!", ";"]))
            sentence = []
            if rng.random() < 0.15:
                out.append("\n\n")
    if sentence:
        out.append(" ".join(sentence) + ".")
    return " ".join(out).replace(" \n\n ", "\n\n")


def ident(rng: random.Random) -> str:
    parts = [rng.choice(WORDS[:200]) for _ in range(rng.randint(1, 3))]
    style = rng.random()
    if style < 0.5:
        return "_".join(parts)
    return parts[0] + "".join(p.capitalize() for p in parts[1:])


def gen_code(rng: random.Random, n_funcs: int) -> str:
    out = []
    for _ in range(n_funcs):
        name, args = ident(rng), [ident(rng) for _ in range(rng.randint(0, 3))]
        body = []
        for _ in range(rng.randint(2, 8)):
            v = ident(rng)
            body.append(rng.choice([
                f"    {v} = {ident(rng)}({', '.join(args)})",
                f"    if {v} is None:\n        raise ValueError(\"{v} is required\")",
                f"    for i in range({rng.randint(1, 500)}):\n        {v}.append(i * {rng.randint(2, 9)})",
                f"    {v} = {{\"{ident(rng)}\": {rng.randint(0, 9999)}, \"{ident(rng)}\": {args[0] if args else 'None'}}}",
                f"    # {gen_prose(rng, rng.randint(4, 12)).rstrip('.')}",
                f"    logger.debug(\"%s: %d\", {v!r}, len({v}))",
            ]))
        body.append(f"    return {ident(rng)}")
        out.append(f"def {name}({', '.join(args)}):\n" + "\n".join(body) + "\n")
    return "\n\n".join(out)


def gen_json_value(rng: random.Random, depth: int) -> Any:
    r = rng.random()
    if depth <= 0 or r < 0.35:
        return rng.choice([
            rng.randint(-1000, 100000), round(rng.uniform(-1, 1000), rng.randint(0, 4)), rng.random() < 0.5,
            None, ident(rng), gen_prose(rng, rng.randint(2, 10)),
            "".join(rng.choice(string.hexdigits.lower()) for _ in range(32)),
            f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:00:00Z",
        ])
    if r < 0.6:
        return [gen_json_value(rng, depth - 1) for _ in range(rng.randint(1, 6))]
    return {ident(rng): gen_json_value(rng, depth - 1) for _ in range(rng.randint(1, 7))}


def gen_cjk(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(CJK) for _ in range(n))


def gen_mixed(rng: random.Random) -> str:
    kind = rng.randrange(9)
    if kind == 0:  # markdown table
        rows = ["| name | spent | limit |", "|---|---:|---:|"]
        rows += [f"| {ident(rng)} | {rng.uniform(0, 500):.2f} | {rng.randint(100, 1000)} |" for _ in range(rng.randint(3, 30))]
        return "Here is the table you asked for:\n\n" + "\n".join(rows)
    if kind == 1:  # logs
        lines = []
        for i in range(rng.randint(5, 30)):
            lines.append(f"2025-03-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
                         f"{rng.randint(0, 59):02d},{rng.randint(0, 999):03d} {rng.choice(['INFO', 'WARN', 'ERROR', 'DEBUG'])} "
                         f"[{ident(rng)}] request_id={rng.getrandbits(64):016x} status={rng.choice([200, 201, 404, 429, 500])} "
                         f"duration_ms={rng.randint(1, 5000)}")
        return "\n".join(lines)
    if kind == 2:  # CSV
        head = ",".join(ident(rng) for _ in range(rng.randint(3, 8)))
        n = head.count(",") + 1
        rows = [",".join(str(rng.choice([rng.randint(0, 10**6), round(rng.random() * 100, 3), ident(rng)])) for _ in range(n))
                for _ in range(rng.randint(5, 40))]
        return head + "\n" + "\n".join(rows)
    if kind == 3:  # English + CJK
        return " ".join(rng.choice([gen_prose(rng, rng.randint(5, 30)), rng.choice(CJK)]) for _ in range(rng.randint(2, 8)))
    if kind == 4:  # emoji chat
        return " ".join(rng.choice(["great 🎉", "ok 👍", "lol 😂", "ship it 🚀", "hmm 🤔", "❤️", "done ✅"]) + " " +
                        gen_prose(rng, rng.randint(2, 8)) for _ in range(rng.randint(1, 6)))
    if kind == 5:  # base64 / hex blob
        raw = bytes(rng.getrandbits(8) for _ in range(rng.randint(16, 2000)))
        return "Here is the payload: " + (base64.b64encode(raw).decode() if rng.random() < 0.5 else raw.hex())
    if kind == 6:  # URLs and ids
        return "\n".join(f"https://{ident(rng).replace('_', '-')}.example.com/{ident(rng)}/{rng.randint(1, 99999)}?id="
                         f"{rng.getrandbits(128):032x}&page={rng.randint(1, 9)}" for _ in range(rng.randint(1, 25)))
    if kind == 7:  # other languages
        return " ".join(rng.choice(OTHER_LANG) for _ in range(rng.randint(1, 12)))
    # numbers heavy
    return ", ".join(f"{rng.uniform(-1e6, 1e6):.{rng.randint(0, 6)}f}" for _ in range(rng.randint(5, 200)))


def gen_markdown(rng: random.Random) -> str:
    parts = [f"# {gen_prose(rng, 4).rstrip('.')}", gen_prose(rng, rng.randint(20, 120))]
    for _ in range(rng.randint(1, 4)):
        parts.append(f"## {gen_prose(rng, 3).rstrip('.')}")
        parts.append("\n".join(f"- {gen_prose(rng, rng.randint(3, 15))}" for _ in range(rng.randint(2, 6))))
        if rng.random() < 0.5:
            parts.append("```python\n" + gen_code(rng, 1) + "```")
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- requests


def user(text: Any) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def gen_texts(rng: random.Random) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    items += [("short", s) for s in SHORT]
    items += [("prose", p) for p in PROSE]
    items += [("code", c) for c in CODE]
    items += [("cjk", c) for c in CJK]
    items += [("multilingual", t) for t in OTHER_LANG]
    for _ in range(40):
        items.append(("prose", gen_prose(rng, int(rng.choice([8, 20, 50, 120, 250])))))
    for _ in range(30):
        items.append(("code", gen_code(rng, rng.choice([1, 2, 3, 5]))))
    for _ in range(28):
        v = gen_json_value(rng, rng.randint(1, 4))
        items.append(("json", json.dumps(v, indent=rng.choice([None, 2]), ensure_ascii=rng.random() < 0.3)))
    for _ in range(30):
        items.append(("cjk", gen_cjk(rng, rng.choice([1, 3, 8, 15, 25]))))
    for _ in range(40):
        items.append(("mixed", gen_mixed(rng)))
    for _ in range(12):
        items.append(("markdown", gen_markdown(rng)))
    # a few long documents (the 10K-token scale) to exercise sampling
    items.append(("long_prose", "\n\n".join([gen_prose(rng, 1000) for _ in range(2)])))
    items.append(("long_code", gen_code(rng, 35)))
    items.append(("long_json", json.dumps(gen_json_value(random.Random(11), 5), indent=2)))
    items.append(("long_cjk", gen_cjk(rng, 80)))
    return items


def gen_requests(rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    reqs: list[tuple[str, dict[str, Any]]] = []
    for _ in range(30):  # chat turns with system prompts
        msgs = []
        for t in range(rng.choice([1, 1, 3, 5, 7])):
            text = rng.choice([gen_prose(rng, rng.randint(3, 80)), rng.choice(PROSE), rng.choice(SHORT[:14]),
                               rng.choice(CJK)])
            msgs.append(user(text) if t % 2 == 0 else assistant(text))
        p: dict[str, Any] = {"model": MODEL, "max_tokens": 1024, "messages": msgs}
        if rng.random() < 0.7:
            p["system"] = rng.choice(SYSTEMS) if rng.random() < 0.6 else [
                {"type": "text", "text": rng.choice(SYSTEMS)},
                {"type": "text", "text": gen_prose(rng, rng.randint(20, 200)), "cache_control": {"type": "ephemeral"}}]
        if rng.random() < 0.4:
            for m in p["messages"]:
                if isinstance(m["content"], str) and rng.random() < 0.5:
                    m["content"] = [{"type": "text", "text": m["content"]}]
        reqs.append(("chat", p))
    for _ in range(20):  # tool definitions and tool loops
        tools = rng.sample(TOOLS, rng.randint(1, len(TOOLS)))
        choice = rng.choice(["auto", "auto", "any", "none", "tool"])
        tool_choice: dict[str, Any] = {"type": choice}
        if choice == "tool":
            tool_choice["name"] = tools[0]["name"]
        msgs = [user(rng.choice(PROSE))]
        if rng.random() < 0.7:
            tid = f"toolu_{rng.getrandbits(96):024x}"
            t = rng.choice(tools)
            inp = {k: gen_json_value(rng, 0) for k in list(t["input_schema"]["properties"])[: rng.randint(1, 3)]}
            blocks: list[dict[str, Any]] = []
            if rng.random() < 0.5:
                blocks.append({"type": "thinking", "thinking": gen_prose(rng, rng.randint(10, 120)), "signature": "sig" + "A" * 40})
            blocks += [{"type": "text", "text": "Let me check that."},
                       {"type": "tool_use", "id": tid, "name": t["name"], "input": inp}]
            msgs.append(assistant(blocks))
            result: Any = json.dumps(gen_json_value(rng, 3)) if rng.random() < 0.5 else [
                {"type": "text", "text": gen_mixed(rng)}]
            msgs.append(user([{"type": "tool_result", "tool_use_id": tid, "content": result}]))
        p = {"model": MODEL, "max_tokens": 2048, "tools": tools, "tool_choice": tool_choice, "messages": msgs}
        if rng.random() < 0.5:
            p["system"] = rng.choice(SYSTEMS)
        reqs.append(("tools", p))
    return reqs


# --------------------------------------------------------------------------- reference counts


def _block_text(b: dict[str, Any]) -> str:
    t = b.get("type")
    if t == "text":
        return b["text"]
    if t == "thinking":
        return b["thinking"]
    if t == "tool_use":
        return json.dumps({"name": b["name"], "input": b["input"]}, ensure_ascii=False)
    if t == "tool_result":
        c = b.get("content", "")
        return c if isinstance(c, str) else "".join(_block_text(x) for x in c)
    raise ValueError(f"corpus has no {t} blocks")


def render(params: dict[str, Any]) -> tuple[str, int]:
    """The proxy rendering of a request (see module docstring) and its fixed extra tokens."""
    out: list[str] = []
    extra = 0
    tools = params.get("tools") or []
    if tools:
        extra += TOOL_PROMPT[(params.get("tool_choice") or {"type": "auto"})["type"]]
        out += [json.dumps({k: t[k] for k in ("name", "description", "input_schema") if k in t}, ensure_ascii=False)
                for t in tools]
    system = params.get("system")
    if system:
        out.append(system if isinstance(system, str) else "\n".join(b["text"] for b in system))
    for m in params.get("messages", []):
        out.append("\n\nHuman: " if m["role"] == "user" else "\n\nAssistant: ")
        c = m["content"]
        out.append(c if isinstance(c, str) else "".join(_block_text(b) for b in c))
    out.append("\n\nAssistant:")
    return "".join(out), extra


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer-json", required=True, help="anthropic==0.38.0's anthropic/tokenizer.json")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    from tokenizers import Tokenizer  # only the generator needs it

    tok = Tokenizer.from_file(args.tokenizer_json)
    if tok.get_vocab_size() != 65000:
        print("warning: this is not the 65,000-token legacy Claude tokenizer", file=sys.stderr)

    def count(s: str) -> int:
        return len(tok.encode(s).ids) if s else 0

    rng = random.Random(20250301)
    rows: list[dict[str, Any]] = []
    for i, (cat, text) in enumerate(gen_texts(rng)):
        params = {"model": MODEL, "max_tokens": 1024, "messages": [user(text)]}
        rendered, extra = render(params)
        rows.append({"id": f"t{i:04d}", "category": cat, "text_tokens": count(text),
                     "tokens": count(rendered) + extra, "params": params})
    for i, (cat, params) in enumerate(gen_requests(rng)):
        rendered, extra = render(params)
        rows.append({"id": f"r{i:04d}", "category": cat, "text_tokens": None,
                     "tokens": count(rendered) + extra, "params": params})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n")
    size = args.out.stat().st_size
    print(f"wrote {len(rows)} items, {size / 1024:.0f} KiB, {sum(r['tokens'] for r in rows)} reference tokens -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
