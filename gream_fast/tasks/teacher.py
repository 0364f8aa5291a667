"""Teachers write the texts the tasks need: reasoning steps for CoT samples, user preference
summaries, intent queries for item search, and enriched item descriptions.

Two teachers share one interface:
- TemplateTeacher: offline and deterministic, built from the data (categories, brands, recency,
  what follows what across users). Never names the target's SID or title.
- OpenAITeacher: any OpenAI-compatible chat server, with bounded concurrency, retries and a
  resumable cache (gream_fast.tasks.llm_client).
"""
from collections import Counter

from gream_fast.errors import InvalidInputError
from gream_fast.tasks.context import TaskContext

RECENCY = 0.85  # weight of an item one step older than the next


def _join(words: list) -> str:
    words = [w for w in words if w]
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


class Teacher:
    """Batch interface: each method takes lists and returns one text per entry."""

    def reasoning(self, ctx: TaskContext, histories: list, targets: list) -> list:
        """Three steps (behavioural evidence, latent preferences, purchase intent) per sample."""
        raise NotImplementedError

    def preference(self, ctx: TaskContext, histories: list) -> list:
        raise NotImplementedError

    def intent(self, ctx: TaskContext, histories: list, targets: list) -> list:
        """A search query in the user's voice that the target satisfies (never its title)."""
        raise NotImplementedError

    def item_text(self, ctx: TaskContext, items: list, reviews: dict) -> list:
        """One paragraph fusing an item's title, description and up to 8 training reviews."""
        raise NotImplementedError


class TemplateTeacher(Teacher):
    def __init__(self, peek_target: bool = True):
        # Like the reference's LLM teacher, the intent step may use the true next item's
        # categories and brand (never its title or SID); peek_target=False predicts them from
        # the history's transitions alone.
        self.peek_target = peek_target
        self._transitions = None

    # -- evidence ---------------------------------------------------------------------------
    @staticmethod
    def _weighted(ctx, history):
        cats, brands = Counter(), Counter()
        for age, item in enumerate(reversed(history)):
            w = RECENCY ** age
            for c in ctx.categories[item]:
                cats[c] += w
            if ctx.brands[item]:
                brands[ctx.brands[item]] += w
        return cats, brands

    def _evidence(self, ctx, history) -> str:
        # dict.fromkeys, not set: most_common breaks ties by first sight, and a set's order
        # changes with the process's string hash seed (runs would differ)
        counts = Counter(c for i in history for c in dict.fromkeys(ctx.categories[i]))
        brands = Counter(ctx.brands[i] for i in history if ctx.brands[i])
        parts = [f"The user has {len(history)} items in the history"]
        top = [f"{c} ({n})" for c, n in counts.most_common(3) if n > 1]
        if top:
            parts.append(f"the categories that recur most are {_join(top)}")
        elif counts:
            parts.append(f"they span {_join([c for c, _ in counts.most_common(3)])}")
        again = [b for b, n in brands.most_common(2) if n > 1]
        if again:
            parts.append(f"they came back to {_join(again)} more than once")
        recent = [c for i in history[-2:] for c in ctx.categories[i][:1]]
        if recent:
            parts.append(f"the latest items were in {_join(list(dict.fromkeys(recent)))}")
        return "; ".join(parts) + "."

    def _preference(self, ctx, history) -> str:
        cats, brands = self._weighted(ctx, history)
        likes = [c for c, _ in cats.most_common(3)]
        text = (f"They favour {_join(likes)}, with recent choices counting most"
                if likes else "Their taste is broad, without a dominant category")
        if brands:
            b, w = brands.most_common(1)[0]
            if w >= 1.5:
                text += f", and they trust {b}"
        return text + "."

    def _next_categories(self, ctx, history) -> list:
        if self._transitions is None:
            self._transitions = ctx.category_transitions()
        votes = Counter()
        for age, item in enumerate(reversed(history[-3:])):
            for c in ctx.categories[item]:
                for nxt, n in self._transitions.get(c, {}).items():
                    votes[nxt] += n * RECENCY ** age
        return [c for c, _ in votes.most_common(2)]

    def _intent(self, ctx, history, target) -> str:
        if self.peek_target and target is not None and ctx.categories[target]:
            cats = ctx.categories[target][:2]
            brand = ctx.brands[target]
        else:
            cats, brand = self._next_categories(ctx, history), ""
        if not cats:
            return "Their next step is likely to stay close to what they bought last."
        text = f"Their recent moves point to {_join(cats)} next"
        if brand:
            text += f", probably from {brand}"
        return text + "."

    # -- interface --------------------------------------------------------------------------
    def reasoning(self, ctx, histories, targets):
        return [f"1. Behavioural evidence: {self._evidence(ctx, h)}\n"
                f"2. Latent preferences: {self._preference(ctx, h)}\n"
                f"3. Purchase intent: {self._intent(ctx, h, t)}"
                for h, t in zip(histories, targets)]

    def preference(self, ctx, histories):
        return [self._preference(ctx, h) for h in histories]

    def intent(self, ctx, histories, targets):
        out = []
        for h, t in zip(histories, targets):
            cats, brand = ctx.categories[t][:2], ctx.brands[t]
            if not cats:
                cats, brand = self._next_categories(ctx, h), ""
            want = _join(cats) if cats else "something similar to my last purchase"
            out.append(f"I am looking for {want}" + (f", ideally from {brand}" if brand else "")
                       + ".")
        return out

    def item_text(self, ctx, items, reviews):
        out = []
        for i in items:
            text = " ".join(x for x in (ctx.titles[i], ctx.descriptions[i]) if x)
            said = [r for r in reviews.get(i, [])[:8] if r]
            if said:
                text += " Buyers say: " + " ".join(s.rstrip(".") + "." for s in said)
            out.append(text)
        return out


class OpenAITeacher(Teacher):
    """Prompts an OpenAI-compatible chat model; results are cached in `cache_path` (JSONL), so
    an interrupted run resumes where it stopped."""

    def __init__(self, client, cache_path=None):
        self.client, self.cache_path = client, cache_path

    def _ask(self, prompts: list) -> list:
        requests = [[{"role": "user", "content": p}] for p in prompts]
        return self.client.complete_many(requests, cache_path=self.cache_path)

    @staticmethod
    def _describe(ctx, items) -> str:
        return "\n".join(f"- {ctx.titles[i]} ({_join(ctx.categories[i][:3]) or 'no category'})"
                         for i in items)

    def reasoning(self, ctx, histories, targets):
        prompts = [
            "A user bought these items, oldest first:\n" + self._describe(ctx, h) +
            "\nThe item they bought next belongs to: " + (_join(ctx.categories[t][:3]) or "unknown") +
            ".\nWrite three short numbered steps: 1. Behavioural evidence from the history. "
            "2. Latent preferences. 3. Purchase intent. Do not name any specific next item."
            for h, t in zip(histories, targets)]
        return self._ask(prompts)

    def preference(self, ctx, histories):
        return self._ask(["Summarise in two sentences what this user likes, from the items they "
                          "bought (oldest first):\n" + self._describe(ctx, h) for h in histories])

    def intent(self, ctx, histories, targets):
        return self._ask([
            "Write one short search query, in the first person, that a shopper would type to "
            "find an item like this, without naming it: " + ctx.descriptions[t][:500] +
            f" (categories: {_join(ctx.categories[t][:3]) or 'none'})" for t in targets])

    def item_text(self, ctx, items, reviews):
        return self._ask([
            f"Fuse into one paragraph describing the product.\nTitle: {ctx.titles[i]}\n"
            f"Description: {ctx.descriptions[i]}\nReviews:\n" +
            "\n".join(f"- {r}" for r in reviews.get(i, [])[:8]) for i in items])


def make_teacher(name: str, cache_path=None) -> Teacher:
    if name == "template":
        return TemplateTeacher()
    if name == "openai":
        from gream_fast.tasks.llm_client import ChatClient

        return OpenAITeacher(ChatClient.from_env(), cache_path)
    raise InvalidInputError(f"teacher {name!r}: expected 'template' or 'openai'")
