"""Multi-turn tool use over a small stateful world: an online shop with typed tools.

The world keeps state (stock, cart, orders, gift-card balance) and fails in controlled, seeded ways:
a call may answer "temporarily unavailable" without changing anything, so a good policy retries.
Tool calls arrive as OpenAI `tool_calls` on the assistant message; results go back as
`{"role": "tool", "tool_call_id", "content"}` turns. The episode ends when the assistant answers
without tool calls (or after `max_turns`); the reward checks the final state against the task goal:
exactly one order, holding exactly the goal items, paid the way the goal says.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from openk2.rl.env import (
    Environment,
    Observation,
    StepResult,
    Task,
    ToolError,
    check_arguments,
    register_env,
    run_tool_call,
)

CATEGORIES = {
    "laptop": (400, 2000),
    "headphones": (20, 300),
    "mug": (5, 30),
    "notebook": (2, 15),
    "lamp": (15, 120),
}
ADJECTIVES = [
    "Aurora",
    "Basalt",
    "Cobalt",
    "Delta",
    "Ember",
    "Fjord",
    "Granite",
    "Harbor",
    "Indigo",
    "Juniper",
]
SYSTEM = "You are a shopping assistant. Use the tools to do what the user asks, then reply briefly."


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    params = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


TOOLS = [
    _tool(
        "search_products",
        "Find products whose name or category contains the query.",
        {"query": {"type": "string"}, "max_price": {"type": "number", "minimum": 0}},
        ["query"],
    ),
    _tool(
        "add_to_cart",
        "Put a quantity of a product in the cart.",
        {"product_id": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1, "maximum": 100}},
        ["product_id", "quantity"],
    ),
    _tool(
        "remove_from_cart",
        "Take a product out of the cart.",
        {"product_id": {"type": "string"}},
        ["product_id"],
    ),
    _tool("view_cart", "Show the cart and its total.", {}, []),
    _tool(
        "checkout",
        "Pay for the cart and place an order.",
        {"payment_method": {"type": "string", "enum": ["card", "gift_card"]}},
        ["payment_method"],
    ),
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@dataclass
class ShopWorld:
    """The world state and its tools. `failure_rate` and `seed` decide which calls fail transiently."""

    products: dict[str, dict]
    gift_card_balance: float
    failure_rate: float = 0.0
    seed: int = 0
    cart: dict[str, int] = field(default_factory=dict)
    orders: list[dict] = field(default_factory=list)
    calls: int = 0

    def call(self, name: str, arguments: dict) -> dict:
        check_arguments(name, arguments, SCHEMAS)
        self.calls += 1
        if random.Random(f"{self.seed}:{self.calls}").random() < self.failure_rate:
            return {"error": "service temporarily unavailable, please retry"}
        return getattr(self, name)(**arguments)

    def search_products(self, query: str, max_price: float | None = None) -> dict:
        q = query.lower()
        hits = [
            {"product_id": pid, **p}
            for pid, p in self.products.items()
            if (q in p["name"].lower() or q in p["category"])
            and (max_price is None or p["price"] <= max_price)
        ]
        return {"results": hits}

    def _product(self, product_id: str) -> dict:
        if product_id not in self.products:
            raise ToolError(f"no product {product_id!r}")
        return self.products[product_id]

    def add_to_cart(self, product_id: str, quantity: int) -> dict:
        product = self._product(product_id)
        if self.cart.get(product_id, 0) + quantity > product["stock"]:
            raise ToolError(f"only {product['stock']} of {product['name']} in stock")
        self.cart[product_id] = self.cart.get(product_id, 0) + quantity
        return self.view_cart()

    def remove_from_cart(self, product_id: str) -> dict:
        if self.cart.pop(product_id, None) is None:
            raise ToolError(f"{product_id!r} is not in the cart")
        return self.view_cart()

    def view_cart(self) -> dict:
        items = [
            {"product_id": pid, "name": self.products[pid]["name"], "quantity": q}
            for pid, q in self.cart.items()
        ]
        return {"items": items, "total": self._total()}

    def _total(self) -> float:
        return round(sum(self.products[pid]["price"] * q for pid, q in self.cart.items()), 2)

    def checkout(self, payment_method: str) -> dict:
        if not self.cart:
            raise ToolError("the cart is empty")
        total = self._total()
        if payment_method == "gift_card":
            if total > self.gift_card_balance:
                raise ToolError(f"gift card balance {self.gift_card_balance} is below the total {total}")
            self.gift_card_balance = round(self.gift_card_balance - total, 2)
        for pid, q in self.cart.items():
            self.products[pid]["stock"] -= q
        order = {
            "order_id": f"order-{len(self.orders) + 1}",
            "items": dict(self.cart),
            "total": total,
            "payment_method": payment_method,
        }
        self.orders.append(order)
        self.cart = {}
        return order


def _catalogue(rng: random.Random) -> dict[str, dict]:
    products = {}
    names = rng.sample(ADJECTIVES, len(ADJECTIVES))
    for i, (category, (lo, hi)) in enumerate(CATEGORIES.items()):
        for j in range(2):
            pid = f"P{100 + 10 * i + j}"
            products[pid] = {
                "name": f"{names[(2 * i + j) % len(names)]} {category.title()}",
                "category": category,
                "price": float(rng.randint(lo, hi)),
                "stock": rng.randint(1, 5),
            }
    return products


@register_env("tool_use")
class ToolUseEnv(Environment):
    multi_turn = True

    def __init__(self, failure_rate: float = 0.2, max_turns: int = 12):
        super().__init__()
        if not 0.0 <= failure_rate < 1.0 or max_turns < 1:
            raise ValueError(
                f"need 0 <= failure_rate < 1 and max_turns >= 1, got {failure_rate}, {max_turns}"
            )
        self.failure_rate, self.max_turns = failure_rate, max_turns
        self.world: ShopWorld | None = None
        self.turns = 0

    def generate(self, rng: random.Random) -> Task:
        products = _catalogue(rng)
        kind = rng.choice(["named", "cheapest", "two_items"])
        if kind == "named":
            pid = rng.choice(list(products))
            qty = rng.randint(1, products[pid]["stock"])
            request, goal = (
                f"Please buy {qty} x {products[pid]['name']} and pay by card.",
                {"items": {pid: qty}, "payment_method": "card"},
            )
        elif kind == "cheapest":
            category = rng.choice(list(CATEGORIES))
            pid = min(
                (p for p in products if products[p]["category"] == category),
                key=lambda p: (products[p]["price"], p),
            )
            request, goal = (
                f"Buy one of the cheapest {category} you sell, paying by card.",
                {"items": {pid: 1}, "payment_method": "card"},
            )
        else:
            a, b = rng.sample(list(products), 2)
            request = f"Buy one {products[a]['name']} and one {products[b]['name']}; pay with my gift card."
            goal = {"items": {a: 1, b: 1}, "payment_method": "gift_card"}
        balance = (
            float(sum(products[p]["price"] for p in goal["items"]) + rng.randint(0, 50))
            if goal["payment_method"] == "gift_card"
            else 0.0
        )
        seed = rng.randrange(2**31)
        return Task(
            id=f"tool_use:{request}:{seed}",
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": request}],
            answer=goal,
            tools=TOOLS,
            metadata={"products": products, "gift_card_balance": balance, "seed": seed, "kind": kind},
        )

    def reset(self, seed: int | None = None, task: Task | None = None, split: str = "train") -> Observation:
        obs = super().reset(seed=seed, task=task, split=split)
        m = self.task.metadata
        self.world = ShopWorld(
            json.loads(json.dumps(m["products"])), m["gift_card_balance"], self.failure_rate, m["seed"]
        )
        self.turns = 0
        return obs

    def goal_reached(self) -> tuple[bool, str | None]:
        goal, orders = self.task.answer, self.world.orders
        if len(orders) != 1:
            return False, f"{len(orders)} orders placed, the goal is one"
        if orders[0]["items"] != goal["items"]:
            return False, f"ordered {orders[0]['items']}, the goal is {goal['items']}"
        if orders[0]["payment_method"] != goal["payment_method"]:
            return False, f"paid by {orders[0]['payment_method']}, the goal is {goal['payment_method']}"
        return True, None

    def _finish(self, messages: list[dict], reason: str | None = None) -> StepResult:
        self.done = True
        ok, why = self.goal_reached()
        info = {"reason": reason or why, "orders": self.world.orders, "turns": self.turns}
        return StepResult(float(ok and reason is None), True, messages, info)

    def step(self, assistant_message: dict) -> StepResult:
        if self.task is None or self.done:
            raise RuntimeError("step() called without reset() or after the episode ended")
        self.turns += 1
        if not isinstance(assistant_message, dict):
            return self._finish([], "malformed: assistant message is not a dict")
        calls = assistant_message.get("tool_calls") or []
        if not isinstance(calls, list):
            return self._finish([], "malformed: tool_calls is not a list")
        if not calls:
            return self._finish([])
        replies = [self._run_call(call, i) for i, call in enumerate(calls)]
        if self.turns >= self.max_turns:
            return self._finish(replies, "turn limit reached")
        return StepResult(0.0, False, replies, {"turns": self.turns})

    def _run_call(self, call: object, index: int) -> dict:
        return run_tool_call(call, index, self.world.call)

    def score(self, task: Task, text: str) -> tuple[float, dict]:
        return 0.0, {"reason": "tool_use is multi-turn: drive it with reset() and step()"}
