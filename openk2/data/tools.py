"""The tool repository: real tools imported from MCP servers, and synthetic tools grown by hierarchical
domain evolution (K2 report, section 3.1.1: 3,000+ MCP tools and 20,000+ synthetic ones).

Real tools come from any MCP server reachable over stdio (`MCPToolbox`, the official `mcp` SDK); their
input schemas are already JSON Schema, so conversion to the OpenAI tool shape is a rename. Synthetic
tools are grown top-down by an LLM: categories -> application domains per category -> tools per domain
with JSON-Schema parameters. Evolving level by level is what gives coverage: asking for "20,000 tools"
at once gives the same hundred. Every tool is validated (name, description, a JSON-Schema object whose
`required` names real properties) and deduplicated (same normalised name, or same parameter set and
near-identical description) before it enters the repository.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jsonschema

from openk2.client import ChatRequest, LLMClient, Rejected, Stats, extract_json

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")

SEED_CATEGORIES = [
    "productivity", "finance", "travel", "e-commerce", "health", "education", "software development",
    "data analysis", "communication", "smart home", "media and entertainment", "science",
]  # fmt: skip


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON Schema of the arguments object
    source: str  # "mcp:SERVER" for real tools, "synthetic" for evolved ones
    category: str = ""
    domain: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def real(self) -> bool:
        return self.source.startswith("mcp:")

    def to_openai(self) -> dict:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    @classmethod
    def from_dict(cls, d: dict) -> Tool:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def validate_tool(tool: Tool) -> None:
    """Raise Rejected(reason) unless the tool is usable for training data."""
    if not isinstance(tool.name, str) or not NAME_RE.match(tool.name):
        raise Rejected("bad_name")
    if not isinstance(tool.description, str) or len(tool.description.strip()) < 10:
        raise Rejected("no_description")
    schema = tool.parameters
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise Rejected("parameters_not_object")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError:
        raise Rejected("invalid_schema") from None
    props = schema.get("properties", {})
    if not isinstance(props, dict) or not set(schema.get("required", [])) <= set(props):
        raise Rejected("required_not_in_properties")
    for name, prop in props.items():
        if not isinstance(prop, dict) or ("type" not in prop and "enum" not in prop and "anyOf" not in prop):
            raise Rejected(f"untyped_parameter:{name}"[:40])


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def _norm_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def deduplicate(tools: list[Tool], similarity: float = 0.8) -> tuple[list[Tool], int]:
    """Keep the first of each group of duplicates: same normalised name, or the same parameter names
    with descriptions whose word sets overlap by more than `similarity` (Jaccard). Real tools first."""
    kept: list[Tool] = []
    names: set[str] = set()
    by_params: dict[tuple, list[set[str]]] = {}
    dropped = 0
    for t in sorted(tools, key=lambda t: not t.real):
        key = tuple(sorted(t.parameters.get("properties", {})))
        words = _words(t.description)
        near = any(len(words & w) / max(1, len(words | w)) > similarity for w in by_params.get(key, []))
        if _norm_name(t.name) in names or near:
            dropped += 1
            continue
        names.add(_norm_name(t.name))
        by_params.setdefault(key, []).append(words)
        kept.append(t)
    return kept, dropped


def save_tools(tools: list[Tool], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(asdict(t), ensure_ascii=False) + "\n" for t in tools))
    tmp.replace(path)


def load_tools(path: str | Path) -> list[Tool]:
    from openk2.client import read_jsonl

    records = read_jsonl(path)
    if not records:
        raise ValueError(f"{path}: no tools (run `openk2 synth tools` first)")
    return [Tool.from_dict(r) for r in records]


# ----------------------------------------------------------------------------------------------------
# Real tools over MCP


def shipped_server_command(workspace: str | Path) -> list[str]:
    """The command line of the MCP server this project ships (sandboxed python, shell, files)."""
    return [sys.executable, "-m", "openk2.data.mcp_server", "--workspace", str(workspace)]


class MCPToolbox:
    """One live connection to an MCP server started as a subprocess over stdio.

    async with MCPToolbox(cmd) as box:
        tools = await box.list_tools()
        text, is_error = await box.call("python", {"code": "print(1)"})
    """

    def __init__(self, command: list[str], name: str | None = None, timeout_s: float = 60.0):
        if not command:
            raise ValueError("an MCP server command is required")
        self.command = command
        self.name = name or Path(command[0]).name
        self.timeout_s = timeout_s
        self._stack: AsyncExitStack | None = None
        self.client = None

    async def __aenter__(self) -> MCPToolbox:
        from mcp import Client, StdioServerParameters

        self._stack = AsyncExitStack()
        params = StdioServerParameters(command=self.command[0], args=self.command[1:])
        self.client = await self._stack.enter_async_context(
            Client(params, read_timeout_seconds=self.timeout_s)
        )
        return self

    async def __aexit__(self, *exc) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None

    async def list_tools(self) -> list[Tool]:
        result = await self.client.list_tools()
        return [
            Tool(
                name=t.name,
                description=" ".join((t.description or "").split()),
                parameters=t.inputSchema if hasattr(t, "inputSchema") else t.input_schema,
                source=f"mcp:{self.name}",
                category="real",
                domain=self.name,
            )
            for t in result.tools
        ]

    async def call(self, name: str, arguments: dict) -> tuple[str, bool]:
        """The tool's text output and whether the server reported an error."""
        result = await self.client.call_tool(name, arguments)
        text = "\n".join(getattr(c, "text", "") for c in result.content if getattr(c, "type", "") == "text")
        is_error = bool(getattr(result, "isError", getattr(result, "is_error", False)))
        return text, is_error


async def import_mcp_tools(command: list[str], name: str | None = None) -> list[Tool]:
    async with MCPToolbox(command, name) as box:
        return await box.list_tools()


# ----------------------------------------------------------------------------------------------------
# Synthetic tools by hierarchical domain evolution

CATEGORY_PROMPT = """List {n} broad categories of software tools an AI assistant could call for users.
Categories already covered: {have}. Answer with a JSON array of short strings only."""

DOMAIN_PROMPT = """Category: {category}.
List {n} distinct, concrete application domains in this category (for example a kind of app or service),
different from: {have}. Answer with a JSON array of short strings only."""

TOOL_PROMPT = """Application domain: {domain} (category: {category}).
Design {n} tools (functions) that an application in this domain would expose to an AI assistant.
Each tool has a snake_case "name", a one-sentence "description", and "parameters": a JSON Schema object
with "type": "object", "properties" (each with a "type" and a "description") and "required".
Answer with a JSON array of objects with keys name, description, parameters, and nothing else."""


@dataclass
class EvolveArgs:
    categories: int = 8
    domains_per_category: int = 4
    tools_per_domain: int = 5
    temperature: float = 0.8
    seed: int = 0


async def _ask_list(client: LLMClient, prompt: str, args: EvolveArgs, tag: str, salt: str) -> list:
    req = ChatRequest(
        messages=[{"role": "user", "content": prompt}],
        temperature=args.temperature,
        max_tokens=2048,
        seed=args.seed + sum(map(ord, salt)),
        tag=tag,
    )
    out = extract_json((await client.chat(req)).content)
    if not isinstance(out, list):
        raise Rejected("not_a_list")
    return out


async def evolve_tools(client: LLMClient, args: EvolveArgs, stats: Stats | None = None) -> list[Tool]:
    """Categories -> domains -> tools; every rejected piece is counted in stats.rejected by reason."""
    stats = stats or client.stats
    categories = list(SEED_CATEGORIES[: args.categories])
    if len(categories) < args.categories:
        try:
            more = await _ask_list(
                client,
                CATEGORY_PROMPT.format(n=args.categories - len(categories), have=", ".join(categories)),
                args,
                "categories",
                "categories",
            )
            categories += [c for c in more if isinstance(c, str) and c.strip()][
                : args.categories - len(categories)
            ]
        except Rejected as r:
            stats.rejected[f"categories:{r.reason}"] += 1

    async def domains_of(category: str) -> list[tuple[str, str]]:
        try:
            prompt = DOMAIN_PROMPT.format(category=category, n=args.domains_per_category, have="none yet")
            out = await _ask_list(client, prompt, args, "domains", category)
        except Rejected as r:
            stats.rejected[f"domains:{r.reason}"] += 1
            return []
        names = [d.strip() for d in out if isinstance(d, str) and d.strip()][: args.domains_per_category]
        stats.accepted["domains"] += len(names)
        return [(category, d) for d in names]

    async def tools_of(category: str, domain: str) -> list[Tool]:
        try:
            prompt = TOOL_PROMPT.format(domain=domain, category=category, n=args.tools_per_domain)
            out = await _ask_list(client, prompt, args, "tools", category + "/" + domain)
        except Rejected as r:
            stats.rejected[f"tools:{r.reason}"] += 1
            return []
        good = []
        for spec in out:
            try:
                if not isinstance(spec, dict):
                    raise Rejected("not_an_object")
                tool = Tool(
                    name=spec.get("name"),
                    description=spec.get("description"),
                    parameters=spec.get("parameters"),
                    source="synthetic",
                    category=category,
                    domain=domain,
                )
                validate_tool(tool)
            except Rejected as r:
                stats.rejected[f"tools:{r.reason}"] += 1
                continue
            good.append(tool)
        return good

    pairs = [p for group in await asyncio.gather(*(domains_of(c) for c in categories)) for p in group]
    tools = [t for group in await asyncio.gather(*(tools_of(c, d) for c, d in pairs)) for t in group]
    kept, dropped = deduplicate(tools)
    stats.rejected["tools:duplicate"] += dropped
    stats.accepted["tools"] += len(kept)
    return kept
