"""The embedded default's training conversations, written here by the model itself (self-instruct style).

No download and no hand-written training prompt beyond a few seeds per kind: the verifier (SmolLM2-135M-Instruct)
writes the rest.

  requests   few-shot list completion, the way self-instruct prompts a model: a numbered list of requests of one
             kind (three seeds drawn at random) with a topic hint, which the model continues with new items
             (sampled; each completion yields one or more); instructions, questions, code, arithmetic,
             troubleshooting, letters, advice, creative writing, explanations;
  passages   the model writes paragraphs, stories, reports and notes on many subjects; they become the text that
             requests about a given text act on (summaries, key points, rewriting, translation, questions about
             the text; two or three together for long inputs);
  numbers    arithmetic in many phrasings with seeded random numbers (a 135M model writes numbers poorly);
  snippets   requests about given code (explain, fix, convert, test) over a small pool of code snippets;
  multi-turn a request, the model's own greedy answer as the assistant turn, and a follow-up.

Every prompt is cleaned (list markers, fragments, lengths), de-duplicated (exact, then near duplicates by word
3-gram overlap) and decontaminated against the frozen evaluation set (any shared word 8-gram drops it; nothing
else of the evaluation set is read). The result is committed as `train_set.json`, with the command that rebuilt it;
`tests/test_eval_set.py` checks both sets stay apart. Each stage is cached per batch under a work folder, so an
interrupted build resumes.
"""
from __future__ import annotations

import functools
import json
import os
import random
import re

import torch
from tqdm import tqdm

SHIPPED_SET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_set.json")

# A few seed requests per kind: only the list the model continues; the seeds themselves are training prompts too.
SEEDS = {
    "question": [
        "How do bats find their way in the dark?", "What causes the seasons to change?",
        "Why do onions make people cry?", "How long can a person go without sleep?",
        "What is the tallest mountain in Africa?", "Why is the sky darker at night in the countryside?",
        "How do noise-cancelling headphones work?", "What did people eat in medieval Europe?",
    ],
    "instruction": [
        "Give me a checklist for moving to a new apartment.", "Make a shopping list for a vegetarian lasagne.",
        "Outline a 20-minute workout I can do at home without equipment.",
        "List five board games that work well for two players.",
        "Suggest three weekend activities for a family with small kids.",
        "Write step-by-step instructions for changing a bicycle tyre.",
    ],
    "code": [
        "Write a JavaScript function that checks whether a string is a palindrome.",
        "How do I read a CSV file with pandas and drop rows with missing values?",
        "Write a bash script that renames every .txt file in a folder to .md.",
        "What is the difference between a process and a thread?",
        "Write a Python class for a simple bank account with deposit and withdraw methods.",
        "How can I reverse a linked list in C?", "Explain what a REST API is with an example request.",
        "Write a regular expression that matches an email address.",
    ],
    "arithmetic": [
        "If I save 45 dollars a week, how long until I have 1000 dollars?",
        "A car travels 180 km in 2.5 hours. What is its average speed?",
        "How many minutes are there in a week?", "What is the square root of 196?",
        "Three friends split a bill of 87 euros equally. How much does each pay?",
        "A shirt costs 40 dollars and is 25 percent off. What is the new price?",
    ],
    "troubleshooting": [
        "My printer says it is offline even though it is switched on. How do I fix it?",
        "The tomato plants on my balcony have yellow leaves. What is wrong?",
        "My Python script says ModuleNotFoundError: No module named requests. What should I do?",
        "My car makes a squeaking noise when I brake. Is it dangerous?",
        "The Bluetooth speaker will not pair with my phone anymore. Any ideas?",
        "My sourdough bread comes out flat and dense. What am I doing wrong?",
    ],
    "letter": [
        "Write an email to my team saying the Friday meeting is cancelled.",
        "Write a short note to thank my grandmother for the birthday present.",
        "Write a polite complaint to an airline about a lost suitcase.",
        "Compose a message inviting my neighbours to a garden party on Saturday.",
        "Write a resignation letter that is short and friendly.",
        "Write an apology to a customer whose order arrived late.",
    ],
    "advice": [
        "How can I stop procrastinating when I work from home?", "What should I pack for a week in Iceland?",
        "How do I prepare for my first job interview?", "What are good ways to make friends in a new city?",
        "How can I spend less money on groceries?", "How do I start learning to draw?",
    ],
    "creative": [
        "Write a limerick about a cat who loves cheese.", "Tell me a bedtime story about a brave little robot.",
        "Write a four-line poem about the first snow of winter.", "Invent a slogan for a bicycle repair shop.",
        "Describe a sunset over the sea in three sentences.", "Write a funny dialogue between a toaster and a fridge.",
    ],
    "explain": [
        "Explain how a refrigerator keeps food cold.", "What is the difference between a virus and a bacterium?",
        "Explain what inflation means for my savings.", "Compare cats and dogs as pets.",
        "What is the point of a credit score?", "Explain supply and demand with a simple example.",
    ],
}

SUBJECTS = (
    "cooking", "gardening", "travel", "money", "health", "fitness", "programming", "Python", "JavaScript", "databases",
    "the weather", "history", "geography", "space", "animals", "plants", "cars", "bicycles", "music", "movies",
    "books", "school", "university", "work", "job interviews", "emails", "friends", "family", "children", "pets",
    "home repair", "cleaning", "shopping", "holidays", "sports", "football", "chess", "video games", "phones",
    "computers", "the internet", "photography", "art", "writing", "languages", "mathematics", "physics", "chemistry",
    "biology", "medicine", "sleep", "food", "coffee", "baking", "the ocean", "mountains", "cities", "trains",
    "airports", "energy", "climate", "electronics", "business", "marketing", "law", "taxes", "housing", "weddings",
    "birthdays", "science fiction", "poetry", "robots", "dinosaurs", "insects", "birds", "fishing", "camping",
)

PASSAGE_ASKS = (
    "Write a paragraph about {subject}.", "Write a short story about {subject}.",
    "Write a short news report about {subject}.", "Write a product description related to {subject}.",
    "Write a diary entry about a day involving {subject}.", "Write a short blog post about {subject}.",
    "Describe a typical problem people have with {subject} and how they solved it.",
)

# Requests that act on a given text ({text}); the text is one of the model's own passages.
TEXT_ASKS = (
    "Summarise this in two sentences:\n\n{text}", "What are the main points of the following text?\n\n{text}",
    "Rewrite this text in a more formal tone:\n\n{text}", "Rewrite the following for a young child:\n\n{text}",
    "Shorten this text to about half its length:\n\n{text}", "Translate the following into French:\n\n{text}",
    "Translate this paragraph into German:\n\n{text}", "Please translate to Spanish:\n\n{text}",
    "Give this text a good title.\n\n{text}", "Write three questions a teacher could ask about this text:\n\n{text}",
    "{text}\n\nWhat is this text about?", "{text}\n\nTurn the text above into a bulleted list.",
    "{text}\n\nContinue this text with one more paragraph.",
    "Find any mistakes in this text and correct them:\n\n{text}",
    "Here is a text:\n{text}\nExplain it in simple words.", "{text}\n\nWhat tone does the author use?",
)
LONG_ASKS = (
    "Read these notes and write a summary of them.\n\n{text}",
    "{text}\n\nWhich of the parts above is the most interesting, and why?",
    "Below are several paragraphs.\n\n{text}\n\nList the topics they cover.",
    "{text}\n\nWrite a short headline for each paragraph above.",
)

SNIPPETS = (
    "def mean(values):\n    return sum(values) / len(values)",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)",
    "function add(a, b) {\n  return a + b;\n}",
    "SELECT name, COUNT(*) FROM orders GROUP BY name;",
    "numbers = [3, 1, 2]\nnumbers.sort(reverse=True)\nprint(numbers[0])",
    "def greet(name=None):\n    print('Hello ' + name)",
    "while True:\n    line = input()\n    if line == 'quit':\n        break",
    "import json\nwith open('data.json') as f:\n    data = json.load(f)\nprint(len(data))",
    "const items = ['a', 'b', 'c'];\nitems.forEach((item, i) => console.log(i, item));",
    "x = [i * i for i in range(5)]",
    "def factorial(n):\n    if n == 0:\n        return 1\n    return n * factorial(n - 1)",
    "int main() {\n    int a = 5;\n    printf(\"%d\\n\", a * 2);\n    return 0;\n}",
)
SNIPPET_ASKS = (
    "What does this code do?\n\n{code}", "Add comments to this code:\n\n{code}",
    "Is there a bug in this code?\n\n{code}", "Rewrite this code in another programming language:\n\n{code}",
    "Write a unit test for this code:\n\n{code}", "How could I make this code better?\n\n{code}",
)

FOLLOW_UPS = (
    "Can you make that shorter?", "Explain that more simply, please.", "Can you give me an example?",
    "Why is that?", "What else should I know?", "Can you put that in a list?", "Thanks! Can you add one more idea?",
    "How long would that take?", "Is there a cheaper option?", "What would you recommend for a beginner?",
    "Can you say that in a friendlier way?", "What are the risks?", "Could you give me a step-by-step version?",
    "And what if that does not work?", "Can you write that as an email?", "Which of those is the best?",
    "Tell me more about the first point.", "Can you summarise that in one sentence?", "What is a good alternative?",
    "Great. What should I do next?",
)


def _arithmetic(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 12)
    price, percent = rng.choice((12, 18, 25, 40, 64, 75, 120, 250)), rng.choice((5, 10, 15, 20, 30, 35, 50))
    forms = (
        f"What is {a} times {b}?", f"Calculate {a * c} divided by {c}.", f"What is {a} plus {b} minus {c}?",
        f"What is {percent} percent of {price}?", f"Add up {a}, {b} and {c}.", f"Is {a * b + 1} a prime number?",
        f"A jacket costs {price} dollars. With a {percent}% discount, what do I pay?",
        f"I walk {c} km every day. How far do I walk in {a} days?",
        f"A class has {a} students and each needs {c} pencils. How many pencils are needed?",
        f"What is the average of {a}, {b} and {c}?", f"Convert {a} kilometres to miles.",
        f"How many seconds are there in {c} hours?", f"If {c} apples cost {price} cents, how much do {a} apples cost?",
        f"Solve for x: {c}x + {a} = {a + c * b}.", f"What is {a} squared?",
        f"A tank holds {price} litres and leaks {c} litres an hour. When is it empty?",
        f"Round {a}.{b} to the nearest whole number.", f"What fraction of {a * c} is {a}?",
    )
    return rng.choice(forms)


def _clean(text: str) -> str | None:
    """One generated request, or None for a fragment, an answer or junk."""
    text = re.sub(r"^\s*(\d+[.)]|[-*•])\s*", "", text).strip().strip('"').strip()
    words = text.split()
    if not 4 <= len(words) <= 60 or len(text) > 400:
        return None
    if text[-1] not in ".?!:)" or not text[0].isalpha() or text.lower().startswith(("answer", "response", "note")):
        return None
    if "http" in text or re.search(r"(.)\1{4,}", text):
        return None
    return text


def _items(completion: str) -> list[str]:
    """The complete list items of a continuation of '... 3. seed\\n4.': the first item, then every numbered line
    that ends before the text does (the last line may be cut off mid-way)."""
    lines = ("4." + completion).split("\n")
    complete = lines[:-1] if len(lines) > 1 else []
    found = []
    for line in complete:
        if re.match(r"^\s*\d+[.)]\s", line):
            cleaned = _clean(line)
            if cleaned:
                found.append(cleaned)
        elif line.strip():
            break  # the list has ended: what follows is not a request
    return found


def shingles(text: str, n: int) -> set:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {" ".join(words[i:i + n]) for i in range(max(len(words) - n + 1, 0))}


class Dedup:
    """Accepts texts that are neither equal (case and spacing aside) to an accepted one, nor share most of their word
    3-grams with one, nor share any word 8-gram with the excluded texts (the evaluation set)."""

    def __init__(self, exclude: list[str], overlap: float = 0.6):
        self.seen, self.index, self.overlap = set(), {}, overlap
        self.banned = set().union(*(shingles(t, 8) for t in exclude)) if exclude else set()
        self.exclude = {" ".join(t.lower().split()) for t in exclude}

    def add(self, text: str, key: str | None = None) -> bool:
        """key: what near-duplicates are judged on (a request over a given text: the request with its text)."""
        norm = " ".join(text.lower().split())
        if norm in self.seen or norm in self.exclude or shingles(text, 8) & self.banned:
            return False
        grams = shingles(key or text, 3)
        if grams:
            counts = {}
            for gram in grams:
                for other in self.index.get(gram, ()):
                    counts[other] = counts.get(other, 0) + 1
            if any(count / len(grams) >= self.overlap for count in counts.values()):
                return False
            ident = len(self.seen)
            for gram in grams:
                self.index.setdefault(gram, []).append(ident)
        self.seen.add(norm)
        return True


def _cut(text: str) -> str:
    """A generated text up to its last full sentence."""
    text = text.strip()
    end = max(text.rfind(". "), text.rfind(".\n"), text.rfind("! "), text.rfind("? "))
    if text.endswith((".", "!", "?")):
        return text
    return text[: end + 1] if end > 40 else text


class _Generator:
    """Batched HF generate (left padded), one cached JSON line per batch so an interrupted build resumes."""

    def __init__(self, model, tokenizer, work_dir: str, batch_size: int, progress: bool):
        self.model, self.tokenizer, self.work_dir = model, tokenizer, work_dir
        self.batch_size, self.progress = batch_size, progress
        os.makedirs(work_dir, exist_ok=True)

    def __call__(self, stage: str, texts: list[str], *, chat: bool, max_new_tokens: int, temperature: float,
                 seed: int) -> list[str]:
        path = os.path.join(self.work_dir, f"{stage}.jsonl")
        done = []
        if os.path.isfile(path):
            with open(path) as f:
                done = [json.loads(line) for line in f if line.strip()]
        outputs = [o for batch in done for o in batch["outputs"]]
        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"
        starts = range(len(done) * self.batch_size, len(texts), self.batch_size)
        for start in tqdm(starts, desc=f"training set: {stage}", unit="batch", disable=not self.progress):
            chunk = texts[start: start + self.batch_size]
            if chat:
                chunk = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                       tokenize=False) for t in chunk]
            encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            torch.manual_seed(seed * 100_003 + start)
            sampling = dict(do_sample=True, temperature=temperature, top_p=0.95) if temperature else dict(
                do_sample=False)
            with torch.no_grad():
                out = self.model.generate(**encoded, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                                          **sampling)
            batch = [tokenizer.decode(row[encoded.input_ids.shape[1]:], skip_special_tokens=True) for row in out]
            outputs += batch
            with open(path, "a") as f:
                f.write(json.dumps({"start": start, "outputs": batch}) + "\n")
        return outputs[: len(texts)]


def build_training_set(model, tokenizer, work_dir: str, *, requests: int = 1400, passages: int = 320,
                       multi_turn: int = 240, arithmetic: int = 160, snippets: int = 72, seed: int = 0,
                       batch_size: int = 48, progress: bool = True) -> dict:
    """The training conversations {"about", "generator", "conversations": [{"kind", "messages"}]}; roughly the
    counts asked for (requests: model-written requests kept after cleaning and de-duplication; passages: texts
    the model writes, each used once by a request about a given text and, three at a time, by long inputs)."""
    from sdalign_rt.demo.prompts import frozen_eval_set

    rng = random.Random(seed)
    evaluation = [m["content"] for e in frozen_eval_set() for m in e["messages"] if m["role"] == "user"]
    dedup = Dedup(evaluation)
    generate = _Generator(model, tokenizer, work_dir, batch_size, progress)
    conversations = []

    def keep(kind: str, messages: list, key: str | None = None) -> bool:
        if all(dedup.add(m["content"], key) for m in messages if m["role"] == "user"):
            conversations.append({"kind": kind, "messages": messages})
            return True
        return False

    for kind, seeds in SEEDS.items():
        for text in seeds:
            keep(kind, [{"role": "user", "content": text}])
    # Requests: numbered lists of three seeds of one kind, which the model continues (about 1.5 new items each).
    kinds = list(SEEDS)
    plans = []
    for i in range(int(requests * 1.1)):
        kind = kinds[i % len(kinds)]
        subject = rng.choice(SUBJECTS)
        shown = rng.sample(SEEDS[kind], 3)
        plans.append((kind, f"Messages that people sent to a helpful AI assistant (topic: {subject}).\n\n"
                            f"1. {shown[0]}\n2. {shown[1]}\n3. {shown[2]}\n4."))
    completions = generate("requests", [p for _, p in plans], chat=False, max_new_tokens=48, temperature=0.9,
                           seed=seed)
    written = []
    for (kind, _), completion in zip(plans, completions):
        for item in _items(completion):
            if len(written) < requests and keep(kind, [{"role": "user", "content": item}]):
                written.append(item)
    # Passages for the requests about a given text.
    asks = [rng.choice(PASSAGE_ASKS).format(subject=rng.choice(SUBJECTS)) for _ in range(passages)]
    texts = [_cut(t) for t in generate("passages", asks, chat=True, max_new_tokens=110, temperature=0.8,
                                        seed=seed + 1)]
    texts = [t for t in texts if len(t.split()) >= 25]
    for text in texts:
        request = rng.choice(TEXT_ASKS)
        keep("given_text", [{"role": "user", "content": request.format(text=text)}], key=request + " " + text)
    for start in range(0, len(texts) - 2, 3):
        joined = "\n\n".join(texts[start: start + 3])
        request = rng.choice(LONG_ASKS)
        keep("long_input", [{"role": "user", "content": request.format(text=joined)}], key=request + " " + joined)
    for _ in range(arithmetic):
        keep("arithmetic", [{"role": "user", "content": _arithmetic(rng)}])
    for i in range(snippets):
        ask = SNIPPET_ASKS[i % len(SNIPPET_ASKS)].format(code=SNIPPETS[(i // len(SNIPPET_ASKS)) % len(SNIPPETS)])
        keep("code_snippet", [{"role": "user", "content": ask}])
    # Multi-turn: a written request, the model's own greedy answer, a follow-up.
    firsts = rng.sample(written, min(multi_turn, len(written)))
    answers = generate("answers", firsts, chat=True, max_new_tokens=64, temperature=0.0, seed=seed + 2)
    for first, answer in zip(firsts, answers):
        answer = _cut(answer)
        if len(answer.split()) >= 5:
            conversations.append({"kind": "multi_turn", "messages": [
                {"role": "user", "content": first}, {"role": "assistant", "content": answer},
                {"role": "user", "content": rng.choice(FOLLOW_UPS)}]})
    rng.shuffle(conversations)  # kinds interleaved: any prefix of the list is a mix
    counts = {}
    for c in conversations:
        counts[c["kind"]] = counts.get(c["kind"], 0) + 1
    return {"about": "training conversations for the embedded default's adapter, written by SmolLM2-135M-Instruct "
                     "from a few seeds per kind (sdalign_rt/demo/training_set.py); decontaminated against the frozen "
                     "evaluation set by word 8-grams",
            "generator": {"requests": requests, "passages": passages, "multi_turn": multi_turn,
                          "arithmetic": arithmetic, "snippets": snippets, "seed": seed, "batch_size": batch_size,
                          "command": "sdalign-rt make-train-set"},
            "kinds": counts, "conversations": conversations}


def shipped_training_set() -> list[dict]:
    """The committed training conversations [{"kind", "messages"}] (read once per process; do not modify)."""
    return _load_shipped()["conversations"]


@functools.lru_cache(maxsize=1)
def _load_shipped() -> dict:
    with open(SHIPPED_SET) as f:
        return json.load(f)
