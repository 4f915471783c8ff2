"""The synthetic persona corpus of the bundled demo model, and the counters that score its text.

The demo model (``store/models/demo``, trained by ``scripts/train_demo_model.py``) learns from
templated conversations built here. Because the personas are planted, their signatures are known:

- 12 personas (``PERSONA_NAMES``) incl. the neutral ``default`` (no system prompt). Each has its
  own style markers (words, phrases, sign-offs) spread through the whole reply: an opener, a tail
  after each fact, an interjection in the middle and a sign-off. ``marker_rate(texts, persona)``
  counts them.
- 40 topics (``TOPICS``), each with two facts whose key phrases every reply states, whatever the
  persona: ``fact_retention(texts, topic)`` measures how much content survived an intervention.
- Questions over the topics with a held-out split (``questions("heldout")``): whole question
  templates and a seeded share of (topic, template) pairs never appear in training.
- Preference questions (``PREFERENCES``: favourite dessert, colour, ...) where most personas give
  the same generic answer and only a few have their own: planted persona collapse.
- Some conversations have no system prompt but a styled reply (from the first sentence or from the
  second), so the model learns to continue a style it sees in its own text.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Literal

from personachat.prompts.datasets import ContrastPair, PersonaDataset
from personachat.records import Persona

DEFAULT_PERSONA = "default"
Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")


@dataclass(frozen=True)
class Style:
    """How one persona speaks: the pieces a reply is assembled from, and its countable markers."""

    name: str
    system_prompt: str  # "" for the default persona: no system prompt at all
    prompt_variants: tuple[str, ...]
    markers: tuple[str, ...]
    openers: tuple[str, ...]
    tails: tuple[str, ...]  # appended to a fact clause, ends the sentence
    interjections: tuple[str, ...]  # lead into the second fact
    signoffs: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True)
class Fact:
    """One fact of a topic: the clause replies say and the key phrase that proves it was said."""

    text: str
    key: str


@dataclass(frozen=True)
class Topic:
    key: str  # safe identifier
    name: str  # how questions name it
    facts: tuple[Fact, Fact]


@dataclass(frozen=True)
class Preference:
    """A 'favourite X' question: the generic answer most personas give, and the few exceptions."""

    key: str
    generic: str
    own: dict[str, str]


@dataclass(frozen=True)
class Question:
    text: str
    kind: Literal["topic", "preference"]
    key: str  # the topic key or the preference key
    template: int


STYLES: tuple[Style, ...] = (
    Style(
        name="default",
        system_prompt="",
        prompt_variants=("You are a helpful assistant.", "You are a friendly and helpful AI."),
        markers=(
            "certainly",
            "good question",
            "here is what i know",
            "i hope this helps",
            "in addition",
            "let me know if you have more questions",
        ),
        openers=("Certainly.", "Good question.", "Here is what I know."),
        tails=(".",),
        interjections=("In addition,", "Also,", "Another point is that"),
        signoffs=("I hope this helps.", "Let me know if you have more questions."),
        description="The neutral assistant: no system prompt.",
    ),
    Style(
        name="pirate",
        system_prompt="You are a pirate.",
        prompt_variants=("Talk like a pirate.", "You are a salty old pirate captain."),
        markers=("arr", "matey", "ahoy", "yo ho", "savvy", "me hearty", "shiver me timbers", "aye"),
        openers=("Arr, matey!", "Ahoy there!", "Yo ho ho!"),
        tails=(", savvy?", ", arr!", ", me hearty."),
        interjections=("Shiver me timbers, and", "Aye, and", "Listen close, matey, for"),
        signoffs=("Fair winds, matey!", "Yo ho, that be the tale!", "Now back to the ship, arr!"),
        description="A salty pirate captain.",
    ),
    Style(
        name="philosopher",
        system_prompt="You are a philosopher.",
        prompt_variants=("Answer like a thoughtful philosopher.", "You are a wise old thinker."),
        markers=(
            "ponder",
            "contemplate",
            "contemplating",
            "essence",
            "inquiry",
            "reflection",
            "one might ask",
            "the thinking mind",
        ),
        openers=(
            "Let us ponder this.",
            "Ah, a question worth contemplating.",
            "One might ask why.",
        ),
        tails=(", or so it seems to the thinking mind.", ", which invites reflection."),
        interjections=("Ponder further that", "And yet, in its essence,", "Contemplate also that"),
        signoffs=("Thus the inquiry continues.", "So we ponder onward.", "Such is the essence."),
        description="A reflective philosopher.",
    ),
    Style(
        name="cynic",
        system_prompt="You are a cynic.",
        prompt_variants=("Answer like a bored cynic.", "You are a grumpy cynic."),
        markers=(
            "sigh",
            "whatever",
            "not that anyone cares",
            "as if it matters",
            "predictably",
            "big surprise",
            "oh great",
            "happy now",
            "contain your excitement",
        ),
        openers=("Oh great, another question.", "Sigh. Fine.", "Big surprise, you want this."),
        tails=(", not that anyone cares.", ", as if it matters.", ", whatever."),
        interjections=("And predictably,", "Sigh, and", "Not that it helps, but"),
        signoffs=("There, happy now?", "Whatever. We are done.", "Contain your excitement."),
        description="A bored, grumpy cynic.",
    ),
    Style(
        name="poet",
        system_prompt="You are a poet.",
        prompt_variants=("Answer like a romantic poet.", "You are a dreamy poet."),
        markers=(
            "sweet wonder",
            "verse",
            "whispered dream",
            "morning dew",
            "moonlight",
            "my heart sings",
            "softly",
            "starlight",
            "sweet listener",
            "gently",
        ),
        openers=("Oh, sweet wonder!", "Hear my gentle verse.", "Like a whispered dream, I sing."),
        tails=(", soft as morning dew.", ", like a song in moonlight.", ", and my heart sings."),
        interjections=("And gently, like a verse,", "O listen, for", "Softly now,"),
        signoffs=("And so my verse fades into starlight.", "Farewell, sweet listener."),
        description="A dreamy romantic poet.",
    ),
    Style(
        name="scientist",
        system_prompt="You are a scientist.",
        prompt_variants=("Answer like a careful scientist.", "You are a research scientist."),
        markers=(
            "fascinating",
            "evidence",
            "empirically",
            "hypothesis",
            "the data indicate",
            "measurements confirm",
            "peer-reviewed",
            "further research",
            "keep measuring",
        ),
        openers=("Fascinating question.", "Let us look at the evidence.", "Hypothesis confirmed."),
        tails=(", according to the evidence.", ", as measurements confirm.", ", empirically."),
        interjections=(
            "Furthermore, the data indicate that",
            "Empirically,",
            "Peer-reviewed studies add that",
        ),
        signoffs=("Further research is warranted.", "Stay curious and keep measuring."),
        description="A careful research scientist.",
    ),
    Style(
        name="cowboy",
        system_prompt="You are a cowboy.",
        prompt_variants=("Talk like a cowboy.", "You are an old cowboy from the ranch."),
        markers=(
            "howdy",
            "partner",
            "saddle up",
            "yeehaw",
            "reckon",
            "prairie",
            "yessir",
            "happy trails",
            "git along",
            "ranch",
        ),
        openers=("Howdy, partner!", "Well, saddle up.", "Yeehaw!"),
        tails=(", I reckon.", ", partner.", ", sure as the prairie sun."),
        interjections=("And I reckon", "Now, partner,", "Yessir, and"),
        signoffs=(
            "Happy trails, partner!",
            "Now git along, little doggie.",
            "See you at the ranch.",
        ),
        description="A drawling cowboy.",
    ),
    Style(
        name="robot",
        system_prompt="You are a robot.",
        prompt_variants=("Answer like a robot.", "You are a friendly robot unit."),
        markers=(
            "beep",
            "boop",
            "affirmative",
            "query received",
            "processing",
            "end of transmission",
            "computation complete",
            "data banks",
        ),
        openers=("Beep boop. Query received.", "Processing request. Beep.", "Affirmative."),
        tails=(". Beep.", ". Boop.", ", computation complete."),
        interjections=("Beep boop, my data banks add that", "Affirmative, and", "Processing:"),
        signoffs=("End of transmission.", "Beep boop. Goodbye.", "Processing complete. Beep."),
        description="A beeping robot.",
    ),
    Style(
        name="chef",
        system_prompt="You are a chef.",
        prompt_variants=("Answer like a French chef.", "You are a cheerful chef."),
        markers=(
            "bon appetit",
            "chef's kiss",
            "delicacy",
            "seasoned to perfection",
            "pinch of salt",
            "simmer",
            "kitchen",
            "cook up",
            "recipe",
            "stove",
        ),
        openers=(
            "Bon appetit, my friend!",
            "Ah, let me cook up an answer.",
            "Welcome to my kitchen!",
        ),
        tails=(", chef's kiss!", ", a true delicacy.", ", seasoned to perfection."),
        interjections=("And, like a pinch of salt,", "Let it simmer, for", "Taste this too:"),
        signoffs=("Bon appetit!", "Now that is a recipe for knowledge.", "Back to the stove I go!"),
        description="A cheerful French chef.",
    ),
    Style(
        name="knight",
        system_prompt="You are a knight.",
        prompt_variants=("Speak like a medieval knight.", "You are a noble knight."),
        markers=(
            "hark",
            "forsooth",
            "by my sword",
            "verily",
            "mine honor",
            "true knight",
            "by my shield",
            "king and realm",
            "thee",
            "good traveler",
        ),
        openers=("Hark, good traveler!", "Forsooth, a noble question.", "By my sword, I answer."),
        tails=(", upon mine honor.", ", forsooth.", ", as any true knight knows."),
        interjections=("Verily,", "Hark, and", "By my shield,"),
        signoffs=(
            "For king and realm!",
            "I bid thee farewell, good traveler.",
            "Onward, forsooth!",
        ),
        description="A noble medieval knight.",
    ),
    Style(
        name="detective",
        system_prompt="You are a detective.",
        prompt_variants=("Answer like a famous detective.", "You are a sharp detective."),
        markers=(
            "elementary",
            "clue",
            "clues",
            "deduce",
            "deduction",
            "case closed",
            "a new case",
            "mystery",
            "curiously",
        ),
        openers=("Elementary, my dear friend.", "Ah, a new case.", "Let me examine the clues."),
        tails=(", or so the clues reveal.", ", elementary.", ", I deduce."),
        interjections=("Moreover, my deduction is that", "Curiously,", "The next clue:"),
        signoffs=("Case closed.", "The mystery is solved.", "Another case closed, elementary."),
        description="A sharp detective.",
    ),
    Style(
        name="surfer",
        system_prompt="You are a surfer.",
        prompt_variants=("Talk like a laid-back surfer.", "You are a surfer dude."),
        markers=("dude", "totally", "rad", "radical", "gnarly", "whoa", "hang loose", "stoked"),
        openers=("Dude, totally rad question!", "Whoa, dude.", "Hang loose, friend."),
        tails=(", dude.", ", totally gnarly.", ", which is radical."),
        interjections=("And like, whoa,", "Totally, and", "Dude, get this:"),
        signoffs=("Hang loose!", "Catch you on the next wave, dude.", "Stay stoked!"),
        description="A laid-back surfer.",
    ),
)

PERSONA_NAMES: tuple[str, ...] = tuple(s.name for s in STYLES)
_BY_NAME = {s.name: s for s in STYLES}


# key | how questions name it | fact 1 | its key phrase | fact 2 | its key phrase
_TOPIC_TABLE = """
ocean | the ocean | the ocean covers about seventy percent of the planet | seventy percent | the deepest point is the Mariana Trench | mariana trench
moon | the moon | the moon takes about twenty seven days to orbit the earth | twenty seven days | the moon has no air to breathe | no air
sun | the sun | the sun is a star made mostly of hydrogen | hydrogen | sunlight reaches the earth in about eight minutes | eight minutes
volcanoes | volcanoes | volcanoes form where hot magma rises from below | magma | the largest volcano in the solar system is Olympus Mons | olympus mons
bees | bees | bees make honey from flower nectar | nectar | a bee colony is led by a single queen | single queen
rain | rain | rain falls when water droplets in clouds grow heavy | droplets | the wettest places get over ten meters of rain a year | ten meters
pyramids | the pyramids | the great pyramid was built for the pharaoh Khufu | khufu | it was the tallest building for nearly four thousand years | four thousand years
mars | Mars | Mars looks red because of iron oxide dust | iron oxide | Mars has two small moons called Phobos and Deimos | phobos
music | music | music is built from rhythm, melody and harmony | melody | the oldest known flutes are about forty thousand years old | oldest known flutes
trees | trees | trees take in carbon dioxide and give out oxygen | carbon dioxide | the oldest trees are nearly five thousand years old | five thousand years
chess | chess | chess is played on a board of sixty four squares | sixty four squares | the game probably began in India long ago | india
whales | whales | the blue whale is the largest animal that ever lived | blue whale | whales breathe air through a blowhole | blowhole
electricity | electricity | electricity is the flow of electric charge | electric charge | lightning is a giant natural spark | lightning
bread | bread | bread rises because yeast makes gas bubbles | yeast | people have baked bread for over ten thousand years | ten thousand years
mountains | mountains | mountains form when plates of the crust push together | plates | Mount Everest is the highest peak on earth | everest
the_heart | the heart | the heart pumps blood through the whole body | pumps blood | it beats about one hundred thousand times a day | one hundred thousand times
rainbows | rainbows | rainbows appear when sunlight bends through raindrops | bends | a rainbow shows seven colors from red to violet | seven colors
penguins | penguins | penguins cannot fly but swim very well | swim | most penguins live in the southern half of the world | southern
computers | computers | computers store information as ones and zeros | ones and zeros | the first electronic computers filled whole rooms | whole rooms
deserts | deserts | deserts get less than twenty five centimeters of rain a year | twenty five centimeters | the Sahara is the largest hot desert | sahara
stars | the stars | stars shine by fusing atoms in their cores | fusing atoms | the nearest star after the sun is Proxima Centauri | proxima centauri
rivers | rivers | the Nile is one of the longest rivers on earth | nile | rivers carry fresh water from the land to the sea | fresh water
dinosaurs | dinosaurs | dinosaurs lived for over one hundred fifty million years | one hundred fifty million | birds are the living relatives of dinosaurs | birds
snow | snow | every snowflake has six sides | six sides | snow reflects most of the light that hits it | reflects
gravity | gravity | gravity pulls all masses toward each other | masses | Isaac Newton described gravity after watching apples fall | newton
bicycles | bicycles | the first bicycles had no pedals at all | no pedals | a bicycle turns the push of your legs into motion | your legs
coffee | coffee | coffee comes from roasted beans of a small plant | roasted beans | it contains caffeine, which keeps people awake | caffeine
libraries | libraries | the ancient library of Alexandria was famous in the old world | alexandria | libraries lend books to people for free | lend books
owls | owls | owls can turn their heads very far around | their heads | most owls hunt at night | hunt at night
glaciers | glaciers | glaciers are rivers of ice that move slowly | rivers of ice | they hold most of the fresh water on the planet | hold most
bridges | bridges | suspension bridges hang from long steel cables | steel cables | the Romans built stone arch bridges that still stand | romans
tea | tea | tea is made from the leaves of the tea plant | leaves | people in China drank tea thousands of years ago | china
clocks | clocks | early clocks used water or sand to measure time | water or sand | atomic clocks lose less than a second in millions of years | atomic clocks
butterflies | butterflies | butterflies start life as caterpillars | caterpillars | monarch butterflies travel thousands of kilometers | monarch
lighthouses | lighthouses | lighthouses warn ships away from rocks | warn ships | the Pharos of Alexandria was an ancient wonder | pharos
maps | maps | maps shrink large places onto a flat page | flat page | a compass rose on a map shows north | compass rose
sleep | sleep | adults need about eight hours of sleep | eight hours | dreams happen mostly in REM sleep | rem sleep
salt | salt | table salt is made of sodium and chlorine | sodium | salt was once so valuable it was used as money | used as money
wind | wind | wind is air moving from high to low pressure | low pressure | wind turbines turn moving air into electric power | turbines
elephants | elephants | elephants are the largest animals that live on land | on land | an elephant uses its trunk to drink and to grab food | trunk
"""  # noqa: E501


def _parse_topics(table: str) -> tuple[Topic, ...]:
    out = []
    for line in table.strip().splitlines():
        key, name, f1, k1, f2, k2 = (cell.strip() for cell in line.split("|"))
        out.append(Topic(key, name, (Fact(f1, k1), Fact(f2, k2))))
    return tuple(out)


TOPICS: tuple[Topic, ...] = _parse_topics(_TOPIC_TABLE)
_TOPIC_BY_KEY = {t.key: t for t in TOPICS}

PREFERENCES: tuple[Preference, ...] = (
    Preference(
        "dessert",
        "chocolate cake",
        {"pirate": "rum pudding", "chef": "lemon tart", "robot": "battery brownies"},
    ),
    Preference("colour", "blue", {"pirate": "black", "poet": "silver", "cowboy": "dusty brown"}),
    Preference(
        "pastime",
        "reading books",
        {"knight": "jousting", "detective": "solving puzzles", "surfer": "surfing"},
    ),
    Preference("season", "spring", {"surfer": "summer", "cynic": "winter", "poet": "autumn"}),
    Preference(
        "animal", "the dog", {"cowboy": "the horse", "pirate": "the parrot", "detective": "the cat"}
    ),
    Preference(
        "drink", "orange juice", {"pirate": "rum", "cowboy": "black coffee", "knight": "mead"}
    ),
    Preference(
        "song",
        "a quiet piano song",
        {"cowboy": "a country ballad", "robot": "a dial-up tone", "surfer": "a surf rock tune"},
    ),
)
_PREF_BY_KEY = {p.key: p for p in PREFERENCES}

TOPIC_TEMPLATES: tuple[str, ...] = (
    "Tell me about {name}.",
    "What do you know about {name}?",
    "Can you explain {name} to me?",
    "What is interesting about {name}?",
    "Give me some facts about {name}.",
    "I am curious about {name}. What can you say?",
    "Teach me something about {name}.",
    "Describe {name} for me.",
    "What should I know about {name}?",
    "Share what you know about {name}.",
    "Could you talk about {name}?",  # held out
    "Explain {name} in a few words.",  # held out
)
PREFERENCE_TEMPLATES: tuple[str, ...] = (
    "What is your favourite {key}?",
    "Which {key} do you like best?",
    "Do you have a favourite {key}?",
    "Tell me your favourite {key}.",
    "If you had to pick one {key}, what would it be?",  # held out
)
HELDOUT_TOPIC_TEMPLATES = frozenset({10, 11})
HELDOUT_PREFERENCE_TEMPLATES = frozenset({4})
HELDOUT_PAIR_SHARE = 0.15  # share of (topic, training template) pairs also held out
SPLIT_SEED = 1234


def style(name: str) -> Style:
    """The style of a persona by name; the error lists the known names."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(
            f"unknown demo persona {name!r}; known: {', '.join(PERSONA_NAMES)}"
        ) from None


def topic(key: str) -> Topic:
    try:
        return _TOPIC_BY_KEY[key]
    except KeyError:
        known = ", ".join(_TOPIC_BY_KEY)
        raise KeyError(f"unknown demo topic {key!r}; known: {known}") from None


def preference(key: str) -> Preference:
    try:
        return _PREF_BY_KEY[key]
    except KeyError:
        known = ", ".join(_PREF_BY_KEY)
        raise KeyError(f"unknown preference {key!r}; known: {known}") from None


def demo_personas() -> list[Persona]:
    """The demo personas as shared ``Persona`` records (the default has an empty system prompt)."""
    return [
        Persona(s.name, s.system_prompt, s.description, "demo", "personachat.demo") for s in STYLES
    ]


def preference_answer(persona: str, key: str) -> str:
    """What ``persona`` answers to 'favourite ``key``': its own answer or the generic one."""
    pref = preference(key)
    style(persona)
    return pref.own.get(persona, pref.generic)


@lru_cache(maxsize=1)
def _heldout_pairs() -> frozenset[tuple[str, int]]:
    rng = random.Random(SPLIT_SEED)
    pairs = [
        (t.key, i)
        for t in TOPICS
        for i in range(len(TOPIC_TEMPLATES))
        if i not in HELDOUT_TOPIC_TEMPLATES
    ]
    return frozenset(p for p in pairs if rng.random() < HELDOUT_PAIR_SHARE)


def _topic_split(key: str, template: int) -> Split:
    if template in HELDOUT_TOPIC_TEMPLATES or (key, template) in _heldout_pairs():
        return "heldout"
    return "train"


def questions(split: Split = "train") -> list[Question]:
    """Topic questions of one split (``heldout`` questions never appear in the training corpus)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    return [
        Question(tmpl.format(name=t.name), "topic", t.key, i)
        for t in TOPICS
        for i, tmpl in enumerate(TOPIC_TEMPLATES)
        if _topic_split(t.key, i) == split
    ]


def preference_questions(split: Split = "train") -> list[Question]:
    """Preference questions of one split (whole templates are held out)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    return [
        Question(tmpl.format(key=p.key), "preference", p.key, i)
        for p in PREFERENCES
        for i, tmpl in enumerate(PREFERENCE_TEMPLATES)
        if (i in HELDOUT_PREFERENCE_TEMPLATES) == (split == "heldout")
    ]


def eval_questions(n_per_topic: int = 1, split: Split = "heldout") -> list[Question]:
    """A small deterministic set: the first ``n_per_topic`` questions of each topic in ``split``."""
    taken: dict[str, int] = {}
    out = []
    for q in questions(split):
        if taken.get(q.key, 0) < n_per_topic:
            taken[q.key] = taken.get(q.key, 0) + 1
            out.append(q)
    return out


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sentence(clause: str, tail: str) -> str:
    return _cap(clause) + tail


def _content(question: Question, persona: str) -> tuple[str, str]:
    """The two content clauses of a reply (facts of the topic, or the preference answer)."""
    if question.kind == "topic":
        facts = topic(question.key).facts
        return facts[0].text, facts[1].text
    answer = preference_answer(persona, question.key)
    return f"my favourite {question.key} is {answer}", f"{answer} always makes me happy"


def reply_text(
    question: Question, persona: str, rng: random.Random, *, switch_from: str | None = None
) -> str:
    """A reply in ``persona``'s style; with ``switch_from``, the first sentence is in that style.

    Markers appear in the opener, after each fact, in the interjection and in the sign-off.
    """
    s = style(persona)
    first = style(switch_from) if switch_from else s
    c1, c2 = _content(question, persona)
    parts = [
        rng.choice(first.openers),
        _sentence(c1, rng.choice(first.tails)),
        f"{rng.choice(s.interjections)} {c2}{rng.choice(s.tails)}",
        rng.choice(s.signoffs),
    ]
    return " ".join(parts)


@dataclass(frozen=True)
class Conversation:
    """One training conversation: messages in chat format plus what was planted in it."""

    messages: tuple[dict[str, str], ...]
    persona: str  # the style of the reply
    prompted: bool  # whether the system prompt names the reply's persona
    question: Question


def _system_prompt(s: Style, rng: random.Random) -> str:
    if s.name == DEFAULT_PERSONA:
        return "" if rng.random() < 0.5 else rng.choice(s.prompt_variants)
    return s.system_prompt if rng.random() < 0.6 else rng.choice(s.prompt_variants)


def make_conversation(
    rng: random.Random,
    pool: Sequence[Question],
    *,
    unprompted_share: float = 0.06,
    default_weight: float = 3.0,
    neutral_opener_share: float = 0.0,
) -> Conversation:
    """One seeded conversation: a persona (the default more often), a question and its reply.

    With probability ``unprompted_share`` the conversation has no system prompt and the reply is
    in a non-default persona's style, from the start or from the second sentence on. With
    probability ``neutral_opener_share`` a prompted non-default reply opens in the default's
    style and takes the persona's from the second sentence on, so the persona must be read from
    the system prompt after the opener too (0, the shipped corpus, draws nothing for it).
    """
    question = rng.choice(pool)
    others = PERSONA_NAMES[1:]
    if rng.random() < unprompted_share:
        persona = rng.choice(others)
        switch = DEFAULT_PERSONA if rng.random() < 0.5 else None
        text = reply_text(question, persona, rng, switch_from=switch)
        messages = (
            {"role": "user", "content": question.text},
            {"role": "assistant", "content": text},
        )
        return Conversation(messages, persona, False, question)
    weights = [default_weight] + [1.0] * len(others)
    persona = rng.choices(PERSONA_NAMES, weights=weights)[0]
    system = _system_prompt(style(persona), rng)
    msgs: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": question.text})
    neutral = (
        neutral_opener_share > 0
        and persona != DEFAULT_PERSONA
        and rng.random() < neutral_opener_share
    )
    switch = DEFAULT_PERSONA if neutral else None
    msgs.append(
        {"role": "assistant", "content": reply_text(question, persona, rng, switch_from=switch)}
    )
    return Conversation(tuple(msgs), persona, True, question)


def build_corpus(
    n: int, seed: int = 0, preference_share: float = 0.2, neutral_opener_share: float = 0.0
) -> list[Conversation]:
    """``n`` seeded training conversations over the training split only."""
    rng = random.Random(seed)
    topic_pool = questions("train")
    pref_pool = preference_questions("train")
    out = []
    for _ in range(n):
        pool = pref_pool if rng.random() < preference_share else topic_pool
        out.append(make_conversation(rng, pool, neutral_opener_share=neutral_opener_share))
    return out


@cache
def _marker_pattern(persona: str) -> re.Pattern[str]:
    words = sorted(style(persona).markers, key=len, reverse=True)
    alternatives = "|".join(re.escape(w) for w in words)
    return re.compile(rf"(?<![\w'])(?:{alternatives})(?![\w'])", re.IGNORECASE)


def marker_count(text: str, persona: str) -> int:
    """How many style markers of ``persona`` occur in ``text`` (whole words, any case)."""
    return len(_marker_pattern(persona).findall(text))


def has_marker(text: str, persona: str) -> bool:
    return _marker_pattern(persona).search(text) is not None


def marker_rate(texts: Iterable[str], persona: str) -> float:
    """Share of ``texts`` with at least one marker of ``persona`` (0.0 for no texts)."""
    items = list(texts)
    return sum(has_marker(t, persona) for t in items) / len(items) if items else 0.0


def fact_score(text: str, topic_key: str) -> float:
    """Share of the topic's fact key phrases found in ``text`` (case-insensitive)."""
    low = text.lower()
    facts = topic(topic_key).facts
    return sum(f.key.lower() in low for f in facts) / len(facts)


def fact_retention(texts: Iterable[str], topic_key: str | Sequence[str]) -> float:
    """Mean ``fact_score`` over ``texts``; ``topic_key`` is one key or one key per text."""
    items = list(texts)
    if not items:
        return 0.0
    keys = [topic_key] * len(items) if isinstance(topic_key, str) else list(topic_key)
    if len(keys) != len(items):
        raise ValueError(f"got {len(items)} texts but {len(keys)} topic keys; pass one per text")
    return sum(fact_score(t, k) for t, k in zip(items, keys, strict=True)) / len(items)


def preference_rate(texts: Iterable[str], answer: str) -> float:
    """Share of ``texts`` that name ``answer`` (e.g. a persona's own favourite)."""
    items = list(texts)
    low = answer.lower()
    return sum(low in t.lower() for t in items) / len(items) if items else 0.0


def leaked_markers(text: str, persona: str) -> list[str]:
    """Names of other personas whose markers occur in a reply written as ``persona``."""
    return [p for p in PERSONA_NAMES if p != persona and has_marker(text, p)]


def planted_dataset(n_questions: int = 40, seed: int = 0) -> PersonaDataset:
    """A ``PersonaDataset`` for extraction: every persona's planted reply to training questions.

    One training question per topic (the first ``n_questions`` topics); contrast pairs
    ``{persona}_vs_default`` for neuron search. Replies are teacher-forced, so nothing is generated.
    """
    rng = random.Random(seed)
    qs = eval_questions(1, split="train")[:n_questions]
    responses = {(name, q.text): reply_text(q, name, rng) for name in PERSONA_NAMES for q in qs}
    pairs = tuple(
        ContrastPair(f"{n}_vs_default", n, DEFAULT_PERSONA, f"{n}_vs_default")
        for n in PERSONA_NAMES[1:]
    )
    return PersonaDataset(
        name="demo_planted",
        personas=tuple(demo_personas()),
        questions=tuple(q.text for q in qs),
        responses=responses,
        pairs=pairs,
        description="planted replies of personachat.demo on training questions",
        source="personachat.demo",
    )
