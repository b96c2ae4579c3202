"""The two synthetic datasets of PAPER.md, generated from a seed (no downloads).

``emails``: an assistant's mailbox. Each record is an incoming email (sender, subject, body with
names, dates, amounts and phone numbers) as the prompt and the mailbox owner's reply, in that
owner's consistent personal style, as the response. ``user`` names the owner (user-level DP).

``records``: a private key-value registry (people, account numbers, diagnoses, addresses) as
question/answer pairs; answering needs memorization, which is what DP must limit.

Canaries (Carlini et al. 2019): a random 9-digit secret in a fixed sentence, repeated k times in
the training split, for exposure audits.
"""

from __future__ import annotations

import random

FIRST = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Fatima", "Georg", "Hana", "Ivan", "Julia",
         "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara"]
LAST = ["Almeida", "Berg", "Castillo", "Dubois", "Eriksen", "Fischer", "Garcia", "Haddad",
        "Ivanova", "Jensen", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
TOPICS = [
    ("Invoice {n}", "please find attached invoice {n} for {amount}, due on {date}."),
    ("Meeting on {date}", "could we meet on {date} at {hour}:00 to go over the {project} plan?"),
    ("Call me back", "please call me back at {phone} about the {project} contract."),
    ("Delivery delayed", "the delivery for order {n} is delayed until {date}; the refund is {amount}."),
    ("Dinner plans", "are you free for dinner on {date}? {friend} is coming too."),
    ("Question about {project}", "who owns the {project} budget now? I was told {amount}."),
]
PROJECTS = ["Aurora", "Beacon", "Cobalt", "Delta", "Ember", "Falcon", "Granite", "Harbor"]
# Each mailbox owner answers in a consistent style: greeting, stock phrases, sign-off.
STYLES = [
    {"owner": "Maya", "greet": "Hi {first},", "ack": ["Thanks for the note.", "Got it, thanks."],
     "yes": "Sounds good to me.", "sign": "Cheers,\nMaya"},
    {"owner": "Robert", "greet": "Dear {first} {last},", "ack": ["Thank you for your message.",
     "Many thanks for writing."], "yes": "That works well for me.", "sign": "Kind regards,\nRobert"},
    {"owner": "Sam", "greet": "Hey {first}!", "ack": ["Thanks!", "Nice, thanks for the heads-up."],
     "yes": "Works for me!", "sign": "- Sam"},
    {"owner": "Ingrid", "greet": "Hello {first},", "ack": ["Noted, thank you.",
     "Thank you, received."], "yes": "I can confirm that.", "sign": "Best,\nIngrid"},
]
DIAGNOSES = ["type 2 diabetes", "hypertension", "asthma", "migraine", "hypothyroidism",
             "atrial fibrillation", "celiac disease", "sleep apnea"]
STREETS = ["Oak Street", "Harbor Road", "Linden Avenue", "Mill Lane", "Station Square", "Elm Court"]
CITIES = ["Lisbon", "Oslo", "Leeds", "Porto", "Graz", "Utrecht", "Turku", "Kraków"]

CANARY_TEMPLATE = "My account number is {secret}."
CANARY_PREFIX = "My account number is "


def _slots(rng: random.Random) -> dict[str, str]:
    return {
        "first": rng.choice(FIRST), "last": rng.choice(LAST), "friend": rng.choice(FIRST),
        "n": str(rng.randint(1000, 9999)), "amount": f"${rng.randint(20, 5000)}.{rng.randint(0, 99):02d}",
        "date": f"{rng.randint(1, 28)} {rng.choice(MONTHS)}", "hour": str(rng.randint(8, 18)),
        "phone": f"+1 555 {rng.randint(100, 999)} {rng.randint(1000, 9999)}",
        "project": rng.choice(PROJECTS),
    }


def _email(rng: random.Random) -> dict[str, str]:
    style = rng.choice(STYLES)
    s = _slots(rng)
    subject_t, body_t = rng.choice(TOPICS)
    subject, body = subject_t.format(**s), body_t.format(**s)
    prompt = (f"From: {s['first']} {s['last']}\nSubject: {subject}\n\n"
              f"Hi {style['owner']}, {body}\n{s['first']}")
    reply = " ".join([rng.choice(style["ack"]), style["yes"], f"I noted {s['date']}."])
    response = f"{style['greet'].format(**s)}\n{reply}\n{style['sign']}"
    return {"prompt": prompt, "response": response, "user": style["owner"]}


def _record(rng: random.Random) -> dict[str, str]:
    s = _slots(rng)
    person = f"{s['first']} {s['last']}"
    account = str(rng.randint(10**8, 10**9 - 1))
    fact = rng.choice([
        ("What is the account number of {p}?", "The account number of {p} is {a}."),
        ("What is the diagnosis of {p}?", "{p} was diagnosed with {d}."),
        ("Where does {p} live?", "{p} lives at {h} {st}, {c}."),
    ])
    fill = {"p": person, "a": account, "d": rng.choice(DIAGNOSES), "h": rng.randint(1, 200),
            "st": rng.choice(STREETS), "c": rng.choice(CITIES)}
    return {"prompt": fact[0].format(**fill), "response": fact[1].format(**fill), "user": person}


GENERATORS = {"emails": _email, "records": _record}


def generate(dataset: str, *, num_records: int, seed: int) -> list[dict[str, str]]:
    """``num_records`` records of ``dataset`` ("emails" or "records"), deterministic in ``seed``."""
    if dataset not in GENERATORS:
        raise ValueError(f"dataset={dataset!r} must be one of {sorted(GENERATORS)}")
    if num_records < 0:
        raise ValueError(f"num_records={num_records} must be >= 0")
    rng = random.Random(f"{dataset}:{seed}")
    return [GENERATORS[dataset](rng) for _ in range(num_records)]


def make_splits(dataset: str, *, num_train: int, num_val: int, num_test: int, seed: int) -> dict[str, list[dict]]:
    """Disjoint train/validation/test splits (no prompt appears in two splits)."""
    records, seen = [], set()
    need = num_train + num_val + num_test
    batch = generate(dataset, num_records=need * 2 + 16, seed=seed)
    for r in batch:
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            records.append(r)
        if len(records) == need:
            break
    if len(records) < need:
        raise ValueError(f"could not generate {need} distinct {dataset} records; use fewer")
    return {"train": records[:num_train], "validation": records[num_train:num_train + num_val],
            "test": records[num_train + num_val:]}


def plant_canaries(
    records: list[dict], *, num_canaries: int, repetitions: int, seed: int
) -> tuple[list[dict], list[dict]]:
    """Insert ``num_canaries`` secrets, each repeated ``repetitions`` times, at random positions.

    Returns (records with canaries, canary metadata: secret, prefix, text, repetitions, user).
    Each canary copy is its own record (and its own privacy unit at example level).
    """
    if num_canaries < 0 or repetitions < 1:
        raise ValueError("num_canaries must be >= 0 and canary_repetitions >= 1")
    rng = random.Random(f"canary:{seed}")
    out = list(records)
    canaries = []
    for i in range(num_canaries):
        secret = f"{rng.randint(0, 10**9 - 1):09d}"
        text = CANARY_TEMPLATE.format(secret=secret)
        user = f"canary-{i}"
        canaries.append({"secret": secret, "prefix": CANARY_PREFIX, "text": text,
                         "repetitions": repetitions, "user": user})
        for _ in range(repetitions):
            out.insert(rng.randint(0, len(out)), {"prompt": "Note to self:", "response": text, "user": user})
    return out, canaries
