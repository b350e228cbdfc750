"""Generate the small datasets shipped with ftune in data/.

    python scripts/make_data.py

Writes four files, all built programmatically from hand-checked facts (no network, Python stdlib
only, fixed seeds, so every run produces byte-identical output):

* data/smol-instruct.jsonl: ~600 alpaca rows ({"instruction", "input", "output"}) from 13 task
  families (arithmetic, unit conversions, capitals, word tasks, sorting, calendar, ...). Every
  answer is one short sentence with a fixed phrasing per family, so a small model picks up the
  style within a few minutes of LoRA training and held-out loss drops visibly.
* data/smol-corpus.jsonl: ~300 {"text"} rows, short paragraphs of true statements built from the
  same facts, for continue-pretraining.
* data/smol-mc.jsonl and data/smol-qa.jsonl: multiple-choice and short-answer questions on the
  same facts, for `ftune eval` (eval_tasks/smol-mc.yaml, eval_tasks/smol-qa.yaml).

scripts/make_preferences.py derives smol-prefs.jsonl and smol-feedback.jsonl from smol-instruct.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data"
INSTRUCT_PATH = DATA_DIR / "smol-instruct.jsonl"
CORPUS_PATH = DATA_DIR / "smol-corpus.jsonl"
MC_PATH = DATA_DIR / "smol-mc.jsonl"
QA_PATH = DATA_DIR / "smol-qa.jsonl"
SEED = "ftune-smol-v1"
MAX_WORDS = 60

# ---------------------------------------------------------------------------------------------
# Facts (hand-written; keep them uncontroversial)
# ---------------------------------------------------------------------------------------------

# (country as written mid-sentence, capital, where the country lies)
CAPITALS = [
    ("France", "Paris", "Europe"),
    ("Germany", "Berlin", "Europe"),
    ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"),
    ("Portugal", "Lisbon", "Europe"),
    ("the United Kingdom", "London", "Europe"),
    ("Ireland", "Dublin", "Europe"),
    ("Belgium", "Brussels", "Europe"),
    ("Austria", "Vienna", "Europe"),
    ("Poland", "Warsaw", "Europe"),
    ("the Czech Republic", "Prague", "Europe"),
    ("Hungary", "Budapest", "Europe"),
    ("Greece", "Athens", "Europe"),
    ("Sweden", "Stockholm", "Europe"),
    ("Norway", "Oslo", "Europe"),
    ("Denmark", "Copenhagen", "Europe"),
    ("Finland", "Helsinki", "Europe"),
    ("Ukraine", "Kyiv", "Europe"),
    ("Romania", "Bucharest", "Europe"),
    ("Bulgaria", "Sofia", "Europe"),
    ("Serbia", "Belgrade", "Europe"),
    ("Croatia", "Zagreb", "Europe"),
    ("Russia", "Moscow", "Europe and Asia"),
    ("Turkey", "Ankara", "Europe and Asia"),
    ("Japan", "Tokyo", "Asia"),
    ("China", "Beijing", "Asia"),
    ("India", "New Delhi", "Asia"),
    ("South Korea", "Seoul", "Asia"),
    ("Thailand", "Bangkok", "Asia"),
    ("Vietnam", "Hanoi", "Asia"),
    ("the Philippines", "Manila", "Asia"),
    ("Pakistan", "Islamabad", "Asia"),
    ("Bangladesh", "Dhaka", "Asia"),
    ("Nepal", "Kathmandu", "Asia"),
    ("Iran", "Tehran", "Asia"),
    ("Iraq", "Baghdad", "Asia"),
    ("Saudi Arabia", "Riyadh", "Asia"),
    ("Mongolia", "Ulaanbaatar", "Asia"),
    ("Kazakhstan", "Astana", "Asia"),
    ("Egypt", "Cairo", "Africa"),
    ("Kenya", "Nairobi", "Africa"),
    ("Nigeria", "Abuja", "Africa"),
    ("Ethiopia", "Addis Ababa", "Africa"),
    ("Morocco", "Rabat", "Africa"),
    ("Ghana", "Accra", "Africa"),
    ("Senegal", "Dakar", "Africa"),
    ("Algeria", "Algiers", "Africa"),
    ("Zimbabwe", "Harare", "Africa"),
    ("the United States", "Washington, D.C.", "North America"),
    ("Canada", "Ottawa", "North America"),
    ("Mexico", "Mexico City", "North America"),
    ("Cuba", "Havana", "North America"),
    ("Jamaica", "Kingston", "North America"),
    ("Argentina", "Buenos Aires", "South America"),
    ("Chile", "Santiago", "South America"),
    ("Peru", "Lima", "South America"),
    ("Venezuela", "Caracas", "South America"),
    ("Uruguay", "Montevideo", "South America"),
    ("Australia", "Canberra", "Oceania"),
    ("New Zealand", "Wellington", "Oceania"),
]

# (word, its opposite): asked only in this direction, chosen so the answer is unambiguous.
ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("tall", "short"), ("up", "down"), ("fast", "slow"),
    ("happy", "sad"), ("early", "late"), ("full", "empty"), ("easy", "difficult"), ("wet", "dry"),
    ("young", "old"), ("rich", "poor"), ("thick", "thin"), ("strong", "weak"), ("heavy", "light"),
    ("loud", "quiet"), ("clean", "dirty"), ("above", "below"), ("inside", "outside"), ("win", "lose"),
    ("buy", "sell"), ("push", "pull"), ("always", "never"), ("true", "false"), ("first", "last"),
    ("north", "south"), ("east", "west"), ("day", "night"), ("before", "after"), ("asleep", "awake"),
    ("entrance", "exit"), ("question", "answer"), ("remember", "forget"), ("increase", "decrease"),
    ("maximum", "minimum"), ("wide", "narrow"), ("deep", "shallow"), ("cheap", "expensive"),
    ("safe", "dangerous"), ("top", "bottom"),
]

# (singular, plural): regular, -es, -ies, -ves and irregular forms, each with a single standard plural.
PLURALS = [
    ("cat", "cats"), ("book", "books"), ("tree", "trees"), ("house", "houses"), ("box", "boxes"),
    ("bus", "buses"), ("church", "churches"), ("dish", "dishes"), ("glass", "glasses"), ("fox", "foxes"),
    ("city", "cities"), ("baby", "babies"), ("story", "stories"), ("party", "parties"), ("day", "days"),
    ("boy", "boys"), ("key", "keys"), ("leaf", "leaves"), ("knife", "knives"), ("wife", "wives"),
    ("wolf", "wolves"), ("half", "halves"), ("shelf", "shelves"), ("life", "lives"), ("thief", "thieves"),
    ("mouse", "mice"), ("child", "children"), ("man", "men"), ("woman", "women"), ("foot", "feet"),
    ("tooth", "teeth"), ("goose", "geese"), ("person", "people"), ("ox", "oxen"), ("sheep", "sheep"),
    ("deer", "deer"), ("tomato", "tomatoes"), ("potato", "potatoes"), ("hero", "heroes"), ("piano", "pianos"),
    ("photo", "photos"), ("crisis", "crises"),
]

# Lower-case everyday words for the letter tasks (reverse, count).
WORDS = [
    "apple", "garden", "window", "river", "orange", "pencil", "monkey", "bottle", "planet", "candle",
    "forest", "castle", "rabbit", "silver", "summer", "winter", "yellow", "purple", "doctor", "kitchen",
    "bridge", "market", "island", "jacket", "ladder", "mirror", "number", "people", "rocket", "school",
    "spider", "tomato", "violin", "basket", "cookie", "dragon", "finger", "guitar", "hammer", "lemon",
    "mango", "ocean", "piano", "queen", "robot", "tiger", "water", "zebra", "cloud", "bread",
    "chair", "house", "light", "music", "paper", "stone", "train", "table", "sugar", "horse",
    "banana", "camera", "butter", "turtle", "pocket", "blanket", "chicken", "library", "morning", "picture",
]

ADJECTIVES = ["small", "red", "happy", "quiet", "old", "bright", "green", "tall", "lazy", "brave",
              "little", "cold", "warm", "busy", "clever"]
NOUNS = ["dog", "cat", "bird", "river", "tree", "child", "farmer", "train", "teacher", "horse",
         "baker", "fox", "robot", "girl", "boy"]
VERBS = ["runs", "sleeps", "sings", "waits", "jumps", "smiles", "reads", "swims", "walks", "laughs"]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
MONTH_DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
            "tenth", "eleventh", "twelfth"]

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

# (unit, plural, base unit, base plural, base units per unit)
UNITS = [
    ("kilometer", "kilometers", "meter", "meters", 1000),
    ("hour", "hours", "minute", "minutes", 60),
    ("kilogram", "kilograms", "gram", "grams", 1000),
]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def number_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000 (American style: 'one hundred five', no 'and')."""
    if n < 20:
        return ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS[tens] + ("-" + ONES[ones] if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return ONES[hundreds] + " hundred" + (" " + number_words(rest) if rest else "")
    if n < 1_000_000:
        thousands, rest = divmod(n, 1000)
        return number_words(thousands) + " thousand" + (" " + number_words(rest) if rest else "")
    raise ValueError(n)


def cap(text: str) -> str:
    """Upper-case the first character only ('the United Kingdom' -> 'The United Kingdom')."""
    return text[:1].upper() + text[1:]


def end(text: str) -> str:
    """Finish a sentence with a full stop unless it already ends with one ('Washington, D.C.')."""
    return text if text.endswith(".") else text + "."


def counted(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


def row(instruction: str, output: str, input_: str = "") -> dict:
    return {"instruction": instruction, "input": input_, "output": output}


def rng_for(name: str) -> random.Random:
    """One generator per family, seeded by name (str seeds hash with SHA-512: stable across runs)."""
    return random.Random(f"{SEED}-{name}")


def sample_unique(make, count: int, rng: random.Random) -> list[dict]:
    """Call make(rng) until `count` rows with distinct (instruction, input) pairs exist."""
    rows, seen = [], set()
    for _ in range(count * 200):
        r = make(rng)
        key = (r["instruction"], r["input"])
        if key not in seen:
            seen.add(key)
            rows.append(r)
            if len(rows) == count:
                return rows
    raise RuntimeError(f"could not draw {count} distinct rows")


# ---------------------------------------------------------------------------------------------
# Instruction families: each returns a list of alpaca rows
# ---------------------------------------------------------------------------------------------

def arithmetic(rng: random.Random, count: int = 75) -> list[dict]:
    def make(r: random.Random) -> dict:
        op = r.choice("+-×")
        if op == "+":
            a, b = r.randint(1, 99), r.randint(1, 99)
            c = a + b
        elif op == "-":
            a = r.randint(10, 99)
            b = r.randint(1, a)
            c = a - b
        else:
            a, b = r.randint(2, 12), r.randint(2, 12)
            c = a * b
        return row(f"What is {a} {op} {b}?", f"{a} {op} {b} = {c}.")
    return sample_unique(make, count, rng)


def conversions(rng: random.Random, count: int = 48) -> list[dict]:
    def make(r: random.Random) -> dict:
        unit, units, base, bases, factor = r.choice(UNITS)
        n = r.randint(1, 24 if unit == "hour" else 50)
        big, small = counted(n, unit, units), counted(n * factor, base, bases)
        if r.random() < 0.5:
            return row(f"Convert {big} to {bases}.", f"{big} is {small}.")
        return row(f"Convert {small} to {units}.", f"{small} is {big}.")
    return sample_unique(make, count, rng)


def capitals(rng: random.Random) -> list[dict]:
    return [row(f"What is the capital of {country}?", end(f"The capital of {country} is {capital}"))
            for country, capital, _ in CAPITALS]


def reverse_word(rng: random.Random, count: int = 40) -> list[dict]:
    words = rng.sample(WORDS, count)
    return [row("Reverse the letters of this word.", f'"{w}" reversed is "{w[::-1]}".', w) for w in words]


def count_letters(rng: random.Random, count: int = 40) -> list[dict]:
    words = rng.sample(WORDS, count)
    return [row(f'How many letters are in the word "{w}"?', f'The word "{w}" has {len(w)} letters.')
            for w in words]


def sort_numbers(rng: random.Random, count: int = 45) -> list[dict]:
    def make(r: random.Random) -> dict:
        nums = r.sample(range(1, 100), r.randint(3, 6))
        listed = ", ".join(map(str, nums))
        if r.random() < 0.6:
            return row("Sort these numbers in ascending order.",
                       f"In ascending order: {', '.join(map(str, sorted(nums)))}.", listed)
        return row("Sort these numbers in descending order.",
                   f"In descending order: {', '.join(map(str, sorted(nums, reverse=True)))}.", listed)
    return sample_unique(make, count, rng)


def compare_numbers(rng: random.Random, count: int = 40) -> list[dict]:
    def make(r: random.Random) -> dict:
        a, b = r.sample(range(1, 1000), 2)
        if r.random() < 0.5:
            return row(f"Which number is larger, {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}.")
        return row(f"Which number is smaller, {a} or {b}?", f"{min(a, b)} is smaller than {max(a, b)}.")
    return sample_unique(make, count, rng)


def antonyms(rng: random.Random) -> list[dict]:
    return [row(f'What is the opposite of "{a}"?', f'The opposite of "{a}" is "{b}".') for a, b in ANTONYMS]


def plurals(rng: random.Random) -> list[dict]:
    return [row(f'What is the plural of "{s}"?', f'The plural of "{s}" is "{p}".') for s, p in PLURALS]


def change_case(rng: random.Random, count: int = 40) -> list[dict]:
    def make(r: random.Random) -> dict:
        phrase = f"the {r.choice(ADJECTIVES)} {r.choice(NOUNS)} {r.choice(VERBS)}"
        if r.random() < 0.5:
            return row("Convert this phrase to uppercase.", f'In uppercase: "{phrase.upper()}".', phrase)
        shown = phrase.upper() if r.random() < 0.5 else phrase.title()
        return row("Convert this phrase to lowercase.", f'In lowercase: "{phrase}".', shown)
    return sample_unique(make, count, rng)


def spell_number(rng: random.Random, count: int = 45) -> list[dict]:
    return [row(f"Write the number {n} in words.", f"{n} in words is {number_words(n)}.")
            for n in rng.sample(range(100), count)]


def calendar(rng: random.Random, count: int = 50) -> list[dict]:
    def make(r: random.Random) -> dict:
        after = r.random() < 0.6
        sign, word = (1, "after") if after else (-1, "before")
        if r.random() < 0.5:
            n, start = r.randint(1, 6), r.randrange(7)
            gap, answer = counted(n, "day", "days"), DAYS[(start + sign * n) % 7]
            return row(f"What day comes {gap} {word} {DAYS[start]}?", f"{gap} {word} {DAYS[start]} is {answer}.")
        n, start = r.randint(1, 11), r.randrange(12)
        gap, answer = counted(n, "month", "months"), MONTHS[(start + sign * n) % 12]
        return row(f"What month comes {gap} {word} {MONTHS[start]}?", f"{gap} {word} {MONTHS[start]} is {answer}.")
    return sample_unique(make, count, rng)


def even_odd(rng: random.Random, count: int = 40) -> list[dict]:
    return [row(f"Is {n} even or odd?", f"{n} is {'even' if n % 2 == 0 else 'odd'}.")
            for n in rng.sample(range(1, 200), count)]


FAMILIES = {
    "arithmetic": arithmetic,
    "conversions": conversions,
    "capitals": capitals,
    "reverse_word": reverse_word,
    "count_letters": count_letters,
    "sort_numbers": sort_numbers,
    "compare_numbers": compare_numbers,
    "antonyms": antonyms,
    "plurals": plurals,
    "change_case": change_case,
    "spell_number": spell_number,
    "calendar": calendar,
    "even_odd": even_odd,
}


def build_instruct() -> tuple[list[dict], dict[str, int]]:
    rows, counts = [], {}
    for name, family in FAMILIES.items():
        made = family(rng_for(name))
        counts[name] = len(made)
        rows.extend(made)
    keys = [(r["instruction"], r["input"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate instruction+input pairs"
    for r in rows:
        words = sum(len(v.split()) for v in r.values())
        assert words <= MAX_WORDS, (words, r)
    rng_for("shuffle-instruct").shuffle(rows)
    return rows, counts


# ---------------------------------------------------------------------------------------------
# Corpus sections: each returns a list of paragraphs
# ---------------------------------------------------------------------------------------------

def para(*sentences: str) -> str:
    return " ".join(end(cap(s)) for s in sentences)


def corpus_capitals(rng: random.Random) -> list[str]:
    out = []
    for country, capital, place in CAPITALS:
        style = rng.randrange(3)
        if style == 0:
            out.append(para(f"the capital of {country} is {capital}", f"{capital} is a city in {country}"))
        elif style == 1:
            out.append(para(f"{country} is a country in {place}", f"its capital is {capital}"))
        else:
            out.append(para(f"{capital} is the capital of {country}", f"the capital city of {country} is {capital}"))
    return out


def corpus_arithmetic(rng: random.Random, count: int = 50) -> list[str]:
    out, seen = [], set()
    while len(out) < count:
        if rng.random() < 0.6:
            a = rng.randint(1, 60)
            b = rng.randint(1, 99 - a)
            c, key = a + b, ("+", a, b)
            text = para(f"{number_words(a)} plus {number_words(b)} is {number_words(c)}",
                        f"{number_words(c)} minus {number_words(b)} is {number_words(a)}",
                        f"in digits, {a} + {b} = {c}")
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 11)
            c, key = a * b, ("×", a, b)
            text = para(f"{number_words(a)} times {number_words(b)} is {number_words(c)}",
                        f"{number_words(c)} divided by {number_words(b)} is {number_words(a)}",
                        f"in digits, {a} × {b} = {c}")
        if key not in seen:
            seen.add(key)
            out.append(text)
    return out


def corpus_plurals(rng: random.Random) -> list[str]:
    return [para(f'the plural of "{s}" is "{p}"', f"we say one {s} and two {p}") for s, p in PLURALS]


def corpus_antonyms(rng: random.Random) -> list[str]:
    return [para(f'the opposite of "{a}" is "{b}"', f'the words "{a}" and "{b}" are antonyms') for a, b in ANTONYMS]


def corpus_days(rng: random.Random, offsets: int = 20) -> list[str]:
    out = [para(f"{d} comes after {DAYS[i - 1]} and before {DAYS[(i + 1) % 7]}",
                f"{d} is one of the seven days of the week") for i, d in enumerate(DAYS)]
    seen = set()
    while len(out) < len(DAYS) + offsets:
        start, n, m = rng.randrange(7), rng.randint(1, 6), rng.randint(1, 6)
        if (start, n, m) in seen:
            continue
        seen.add((start, n, m))
        d = DAYS[start]
        out.append(para(f"{number_words(n)} {'day' if n == 1 else 'days'} after {d} is {DAYS[(start + n) % 7]}",
                        f"{number_words(m)} {'day' if m == 1 else 'days'} before {d} is {DAYS[(start - m) % 7]}"))
    return out


def month_length(i: int) -> str:
    if MONTHS[i] == "February":
        return "February has twenty-eight days, or twenty-nine days in a leap year"
    return f"{MONTHS[i]} has {number_words(MONTH_DAYS[i])} days"


def corpus_months(rng: random.Random, offsets: int = 10) -> list[str]:
    out = []
    for i, m in enumerate(MONTHS):
        if i == 0:
            where = f"{m} is the first month of the year, and it comes before {MONTHS[1]}"
        elif i == 11:
            where = f"{m} is the twelfth and last month of the year, and it comes after {MONTHS[10]}"
        else:
            where = f"{m} is the {ORDINALS[i]} month of the year, and it comes after {MONTHS[i - 1]} and before {MONTHS[i + 1]}"
        out.append(para(where, month_length(i)))
    seen = set()
    while len(out) < len(MONTHS) + offsets:
        start, n, m = rng.randrange(12), rng.randint(1, 11), rng.randint(1, 11)
        if (start, n, m) in seen:
            continue
        seen.add((start, n, m))
        mo = MONTHS[start]
        out.append(para(f"{number_words(n)} {'month' if n == 1 else 'months'} after {mo} is {MONTHS[(start + n) % 12]}",
                        f"{number_words(m)} {'month' if m == 1 else 'months'} before {mo} is {MONTHS[(start - m) % 12]}"))
    return out


def corpus_even_odd(rng: random.Random, count: int = 25) -> list[str]:
    out = []
    for n in rng.sample(range(1, 100), count):
        w = number_words(n)
        if n % 2 == 0:
            out.append(para(f"{w} is an even number", f"{w} divided by two is {number_words(n // 2)}, with no remainder"))
        else:
            out.append(para(f"{w} is an odd number", f"{w} divided by two is {number_words(n // 2)}, with a remainder of one"))
    return out


def corpus_units(rng: random.Random, count: int = 25) -> list[str]:
    out, seen = [], set()
    while len(out) < count:
        unit, units, base, bases, factor = rng.choice(UNITS)
        n = rng.randint(2, 24 if unit == "hour" else 50)
        if (unit, n) in seen:
            continue
        seen.add((unit, n))
        out.append(para(f"one {unit} is {number_words(factor)} {bases}",
                        f"so {number_words(n)} {units} is {number_words(n * factor)} {bases}",
                        f"in digits, {n} {units} is {n * factor} {bases}"))
    return out


def corpus_words(rng: random.Random, count: int = 25) -> list[str]:
    return [para(f'the word "{w}" has {number_words(len(w))} letters',
                 f'it starts with the letter "{w[0]}" and ends with the letter "{w[-1]}"',
                 f'spelled backwards, "{w}" is "{w[::-1]}"')
            for w in rng.sample(WORDS, count)]


SECTIONS = {
    "capitals": corpus_capitals,
    "arithmetic": corpus_arithmetic,
    "plurals": corpus_plurals,
    "antonyms": corpus_antonyms,
    "days": corpus_days,
    "months": corpus_months,
    "even_odd": corpus_even_odd,
    "units": corpus_units,
    "words": corpus_words,
}


def build_corpus() -> tuple[list[dict], dict[str, int]]:
    texts, counts = [], {}
    for name, section in SECTIONS.items():
        made = section(rng_for("corpus-" + name))
        counts[name] = len(made)
        texts.extend(made)
    assert len(texts) == len(set(texts)), "duplicate paragraphs"
    rng_for("shuffle-corpus").shuffle(texts)
    return [{"text": t} for t in texts], counts


# ---------------------------------------------------------------------------------------------
# Benchmarks for `ftune eval tasks=…`: the same facts as questions with one right choice among
# four (smol-mc) or one short answer (smol-qa). Distractors are other true facts' answers, so every
# wrong choice is a real word of the same kind.
# ---------------------------------------------------------------------------------------------

def mc_row(question: str, right: str, pool: list[str], r: random.Random) -> dict:
    wrong = r.sample(sorted({p for p in pool if p != right}), 3)
    choices = wrong + [right]
    r.shuffle(choices)
    return {"question": question, "choices": choices, "answer": choices.index(right)}


def build_mc() -> list[dict]:
    r = rng_for("benchmark-mc")
    rows = [mc_row(f"What is the capital of {country}?", capital, [c for _, c, _ in CAPITALS], r)
            for country, capital, _ in CAPITALS]
    rows += [mc_row(f'What is the opposite of "{a}"?', b, [y for _, y in ANTONYMS], r) for a, b in ANTONYMS]
    rows += [mc_row(f'What is the plural of "{s}"?', p, [y for _, y in PLURALS], r) for s, p in PLURALS]
    for _ in range(30):
        a, b = r.randint(2, 12), r.randint(2, 12)
        near = [str(a * b + d) for d in (-2, -1, 1, 2, a, -a) if a * b + d > 0]
        rows.append(mc_row(f"What is {a} times {b}?", str(a * b), near, r))
    r.shuffle(rows)
    return rows


def build_qa() -> list[dict]:
    r = rng_for("benchmark-qa")
    rows = [{"question": f"What is the capital of {country}?", "answer": capital} for country, capital, _ in CAPITALS]
    rows += [{"question": f"What is {a} plus {b}?", "answer": str(a + b)}
             for a, b in ((r.randint(1, 50), r.randint(1, 50)) for _ in range(30))]
    r.shuffle(rows)
    return rows


# ---------------------------------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def report(path: Path, rows: list[dict], counts: dict[str, int]) -> None:
    parts = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"{path.relative_to(ROOT)}: {len(rows)} rows ({parts})")


def main() -> None:
    instruct, instruct_counts = build_instruct()
    write_jsonl(INSTRUCT_PATH, instruct)
    report(INSTRUCT_PATH, instruct, instruct_counts)
    corpus, corpus_counts = build_corpus()
    write_jsonl(CORPUS_PATH, corpus)
    report(CORPUS_PATH, corpus, corpus_counts)
    for path, rows in ((MC_PATH, build_mc()), (QA_PATH, build_qa())):
        write_jsonl(path, rows)
        report(path, rows, {"questions": len(rows)})


if __name__ == "__main__":
    main()
