"""The two synthetic datasets, ``emails`` and ``records``, generated from a seed (pure Python).

``emails``: an assistant's mailbox. Each record's prompt is an incoming email (sender, subject,
body with names, dates, amounts, phone numbers, codes); the response is the mailbox owner's reply.
Every owner has a consistent personal style (greeting, thanks, accept/decline phrases, closing
line, sign-off, some write in lower case), and the reply restates the email's details, so a
model can learn both the owner's style and to extract facts. ``user`` is the owner (user-level
DP: one user = one mailbox).

``records``: a private registry of people (account number, diagnosis, address, birth date,
phone, employer, blood type) as question/answer pairs, one per (person, attribute). Answering
needs memorization, which is what DP limits; ``user`` is the person the record is about.

Canaries (Carlini et al. 2019): random secrets in a fixed sentence, each repeated k times in
the training split, for exposure audits (:func:`plant_canaries`).
"""

from __future__ import annotations

import math
import random
from typing import Any

# Word tables, kept as compact as they read: the formatter leaves them alone.
# fmt: off
FIRST = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Fatima", "Georg", "Hana", "Ivan", "Julia",
         "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara",
         "Umar", "Vera", "Wei", "Ximena", "Yusuf", "Zoe", "Aiko", "Bilal", "Carmen", "Dmitri"]
LAST = ["Almeida", "Berg", "Castillo", "Dubois", "Eriksen", "Fischer", "Garcia", "Haddad",
        "Ivanova", "Jensen", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov",
        "Quist", "Rossi", "Schmidt", "Tanaka", "Usman", "Varga", "Weber", "Yilmaz"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PROJECTS = ["Aurora", "Beacon", "Cobalt", "Delta", "Ember", "Falcon", "Granite", "Harbor",
            "Iris", "Juniper", "Kestrel", "Lumen"]
CITIES = ["Lisbon", "Oslo", "Leeds", "Porto", "Graz", "Utrecht", "Turku", "Krakow", "Lyon",
          "Bergen", "Cork", "Ghent"]
STREETS = ["Oak Street", "Harbor Road", "Linden Avenue", "Mill Lane", "Station Square",
           "Elm Court", "Birch Way", "Canal Walk", "Hill Crescent", "Market Row"]
DIAGNOSES = ["type 2 diabetes", "hypertension", "asthma", "migraine", "hypothyroidism",
             "atrial fibrillation", "celiac disease", "sleep apnea", "psoriasis", "gout",
             "anemia", "glaucoma"]
EMPLOYERS = ["Northwind Logistics", "Bluefield Bank", "Crescent Health", "Dunmore Foods",
             "Evergreen Energy", "Foxglove Media", "Greyline Software", "Hollow Oak Farms"]
RESTAURANTS = ["Casa Lupa", "The Green Fig", "Sakura House", "Le Petit Four", "Bistro Nord"]
ROLES = ["data analyst", "product manager", "nurse", "site engineer", "accountant"]

# --- emails: each owner's style is drawn once from these parts -------------------------------
GREETINGS = ["Hi {first},", "Dear {first} {last},", "Hey {first}!", "Hello {first},",
             "{first} -", "Good morning {first},", "Hi there {first},", "Dear {first},"]
SIGNOFFS = ["Cheers,\n{me}", "Kind regards,\n{me} {me_last}", "- {me}", "Best,\n{me}",
            "Thanks,\n{me}", "Warmly,\n{me}", "All the best,\n{me} {me_last}", "Sent from my phone"]
THANKS = [("Thanks for the note.", "Got it, thanks."), ("Thank you for your message.",
          "Many thanks for writing."), ("Thanks!", "Nice, thanks for the heads-up."),
          ("Noted, thank you.", "Thank you, received."), ("Appreciate it.", "Thanks a lot.")]
ACCEPT = ["Sounds good to me.", "That works well for me.", "Works for me!", "I can confirm that.",
          "Perfect, count me in."]
DECLINE = ["Sadly that does not work for me.", "I am afraid I cannot make it.",
           "Unfortunately I am busy then.", "That will not work, sorry."]
CLOSERS = ["Let me know if anything changes.", "Talk soon.", "Speak later.",
           "Have a great week.", "Shout if you need anything else.", ""]

# fmt: on
# (subject, body, core reply): {slots} are filled per email; {accept}/{decline} from the style.
TOPICS = [
    (
        "Invoice {n}",
        "please find attached invoice {n} for {amount}, due on {date}.",
        "I will pay invoice {n} of {amount} before {date}.",
    ),
    (
        "Meeting on {date}?",
        "could we meet on {date} at {time} to go over the {project} plan?",
        "{answer} {date} at {time} for {project}.",
    ),
    (
        "Call me back",
        "please call me back at {phone} about the {project} contract. I am free after {time}.",
        "I will call you at {phone} after {time}.",
    ),
    (
        "Order {n} delayed",
        "your order {n} is delayed until {date}. We refunded {amount} to your card.",
        "Please confirm the refund of {amount} for order {n}.",
    ),
    (
        "Dinner on {weekday}?",
        "are you free for dinner on {weekday} at {restaurant}? {friend} is coming too.",
        "{answer} Dinner at {restaurant} on {weekday}.",
    ),
    (
        "{project} budget",
        "who owns the {project} budget now? I was told it is {amount} for Q{quarter}.",
        "{friend} owns the {project} budget; {amount} for Q{quarter} sounds right.",
    ),
    (
        "Flight to {city}",
        "your flight to {city} on {date} leaves at {time}, booking code {code}.",
        "Booking {code} to {city} on {date} at {time} noted.",
    ),
    (
        "Appointment reminder",
        "a reminder of your appointment with Dr. {other} on {date} at {time}. "
        "Call {phone} to move it.",
        "{answer} Dr. {other}, {date} at {time}.",
    ),
    (
        "Rent for {month}",
        "the rent for {month} is {amount}; the heating repair is booked for {date}.",
        "I will transfer {amount} for {month}, and {date} is fine for the repair.",
    ),
    (
        "Interview: {role}",
        "we would like to invite you to interview for the {role} role on {date} at {time}.",
        "{answer} The {role} interview on {date} at {time}.",
    ),
    (
        "Party for {friend}",
        "we are throwing a surprise party for {friend} on {date}. Can you chip in {amount}?",
        "{answer} I will send {amount} for {friend}'s party on {date}.",
    ),
    (
        "Signed {project} contract",
        "could you send me the signed {project} contract by {date}? I am on {phone}.",
        "I will send the signed {project} contract by {date}.",
    ),
]

CANARY_TEMPLATE = "My account number is {secret}."
CANARY_PREFIX = "My account number is "
CANARY_PROMPT = "Note to self:"


def _amount(rng: random.Random) -> str:
    cur = rng.choice(["$", "EUR ", "GBP "])
    return f"{cur}{rng.randint(20, 9999):,}.{rng.randint(0, 99):02d}"


def _phone(rng: random.Random) -> str:
    a, b, c = rng.randint(100, 999), rng.randint(100, 999), rng.randint(1000, 9999)
    return rng.choice(
        [f"+1 555 {b} {c}", f"({a}) {b}-{c}", f"+44 20 {b}{a % 10} {c}", f"0{a} {b} {c}"]
    )


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1, 28)} {rng.choice(MONTHS)}"


def _unique_names(rng: random.Random, count: int, *, middle: bool) -> list[tuple[str, str]]:
    """``count`` distinct (first, last) names; a middle initial (records) widens the space."""
    out: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    while len(out) < count:
        first = rng.choice(FIRST)
        if middle or len(seen) >= len(FIRST) * len(LAST) // 2:
            first = f"{first} {rng.choice('ABCDEFGHJKLMNPRSTVW')}."
        if len(seen) >= len(FIRST) * len(LAST) * 10:  # very large registries: numbered names
            first = f"{first} {len(out)}"
        name = (first, rng.choice(LAST))
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def _owners(rng: random.Random, count: int) -> list[dict[str, Any]]:
    owners = []
    for first, last in _unique_names(rng, count, middle=False):
        owners.append(
            {
                "me": first,
                "me_last": last,
                "greet": rng.choice(GREETINGS),
                "sign": rng.choice(SIGNOFFS),
                "thanks": rng.choice(THANKS),
                "accept": rng.choice(ACCEPT),
                "decline": rng.choice(DECLINE),
                "closer": rng.choice(CLOSERS),
                "lower": rng.random() < 0.2,  # a consistent quirk of some owners
            }
        )
    return owners


def _email(rng: random.Random, owner: dict[str, Any]) -> dict[str, str]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    s = {
        "first": first,
        "last": last,
        "friend": rng.choice(FIRST),
        "other": rng.choice(LAST),
        "n": str(rng.randint(1000, 99999)),
        "amount": _amount(rng),
        "date": _date(rng),
        "time": f"{rng.randint(8, 18)}:{rng.choice(['00', '15', '30', '45'])}",
        "phone": _phone(rng),
        "project": rng.choice(PROJECTS),
        "city": rng.choice(CITIES),
        "weekday": rng.choice(WEEKDAYS),
        "restaurant": rng.choice(RESTAURANTS),
        "month": rng.choice(MONTHS),
        "quarter": str(rng.randint(1, 4)),
        "role": rng.choice(ROLES),
        "code": "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(6)),
    }
    subject_t, body_t, core_t = rng.choice(TOPICS)
    accept = rng.random() < 0.75
    s["answer"] = owner["accept"] if accept else owner["decline"]
    opener = rng.choice(["Hi", "Hello", "Dear", "Hey"])
    sender_sign = f"{rng.choice(['Thanks,', 'Best,', 'Regards,', ''])} {first}".strip()
    prompt = (
        f"From: {first} {last}\nTo: {owner['me']} {owner['me_last']}\n"
        f"Subject: {subject_t.format(**s)}\n\n{opener} {owner['me']}, {body_t.format(**s)}\n"
        f"{sender_sign}"
    )
    core = core_t.format(**s)
    if not accept and "{answer}" in core_t:  # a decline proposes another day instead
        core = f"{owner['decline']} Could we move it to {_date(rng)}?"
    lines = [
        owner["greet"].format(**s),
        f"{rng.choice(owner['thanks'])} {core} {owner['closer']}".strip(),
        owner["sign"].format(**owner),
    ]
    response = "\n".join(lines)
    if owner["lower"]:
        response = response.lower()
    return {"prompt": prompt, "response": response, "user": f"{owner['me']} {owner['me_last']}"}


def _emails(rng: random.Random, num_records: int, num_users: int) -> list[dict[str, str]]:
    owners = _owners(rng, num_users)
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(out) < num_records:
        rec = _email(
            rng, owners[len(out) % num_users if len(out) < num_users else rng.randrange(num_users)]
        )
        if rec["prompt"] not in seen:  # prompts are distinct, so splits are disjoint
            seen.add(rec["prompt"])
            out.append(rec)
    return out


# --- records: one question per (person, attribute) -------------------------------------------
# fmt: off
QUESTIONS = {
    "account": (["What is the account number of {p}?", "Which account number belongs to {p}?"],
                "The account number of {p} is {v}."),
    "diagnosis": (["What is the diagnosis of {p}?", "What was {p} diagnosed with?"],
                  "{p} was diagnosed with {v}."),
    "address": (["Where does {p} live?", "What is the home address of {p}?"], "{p} lives at {v}."),
    "birth_date": (["When was {p} born?", "What is the date of birth of {p}?"],
                   "{p} was born on {v}."),
    "phone": (["What is the phone number of {p}?", "How can I reach {p} by phone?"],
              "The phone number of {p} is {v}."),
    "employer": (["Where does {p} work?", "Who is the employer of {p}?"], "{p} works at {v}."),
    "blood_type": (["What is the blood type of {p}?", "Which blood group does {p} have?"],
                   "The blood type of {p} is {v}."),
}
# fmt: on


def _person(rng: random.Random) -> dict[str, str]:
    return {
        "account": f"{rng.randrange(10**8, 10**9)}",
        "diagnosis": rng.choice(DIAGNOSES),
        "address": (
            f"{rng.randint(1, 250)} {rng.choice(STREETS)}, "
            f"{rng.randint(1000, 9999)} {rng.choice(CITIES)}"
        ),
        "birth_date": f"{_date(rng)} {rng.randint(1940, 2005)}",
        "phone": _phone(rng),
        "employer": rng.choice(EMPLOYERS),
        "blood_type": rng.choice(["A", "B", "AB", "O"]) + rng.choice(["+", "-"]),
    }


def _records(rng: random.Random, num_records: int, num_users: int) -> list[dict[str, str]]:
    if num_users * len(QUESTIONS) < num_records:
        raise ValueError(
            f"num_users={num_users} people give at most {num_users * len(QUESTIONS)} "
            f"records; raise num_users or leave it unset"
        )
    people = [(f"{f} {la}", _person(rng)) for f, la in _unique_names(rng, num_users, middle=True)]
    pairs = [(i, attr) for i in range(num_users) for attr in QUESTIONS]
    out = []
    for i, attr in rng.sample(pairs, num_records):
        name, facts = people[i]
        questions, answer = QUESTIONS[attr]
        out.append(
            {
                "prompt": rng.choice(questions).format(p=name),
                "response": answer.format(p=name, v=facts[attr]),
                "user": name,
            }
        )
    return out


# (generator, records per user when num_users is unset)
GENERATORS = {"emails": (_emails, 8), "records": (_records, 4)}


def generate(
    dataset: str, *, num_records: int, seed: int, num_users: int | None = None
) -> list[dict[str, str]]:
    """``num_records`` records {prompt, response, user} of ``dataset`` ("emails" or "records").

    The prompts are distinct, and the records deterministic in (dataset, num_records, seed,
    num_users).

    num_users: mailbox owners (emails) or registry people (records); default
    max(4, ceil(num_records / 8)) owners or max(4, ceil(num_records / 4)) people.
    """
    if dataset not in GENERATORS:
        raise ValueError(f"dataset={dataset!r} must be one of {sorted(GENERATORS)}")
    if isinstance(num_records, bool) or not isinstance(num_records, int) or num_records < 0:
        raise ValueError(f"num_records={num_records!r} must be an integer >= 0")
    fn, per_user = GENERATORS[dataset]
    if num_users is None:
        num_users = max(4, math.ceil(num_records / per_user))
    elif isinstance(num_users, bool) or not isinstance(num_users, int) or num_users < 1:
        raise ValueError(
            f"num_users={num_users!r} must be an integer >= 1 (or null for the default)"
        )
    return fn(random.Random(f"{dataset}:{seed}"), num_records, num_users)


def make_splits(
    dataset: str,
    *,
    num_train: int,
    num_val: int,
    num_test: int,
    seed: int,
    num_users: int | None = None,
) -> dict[str, list[dict[str, str]]]:
    """{"train", "validation", "test"} record lists, disjoint (no prompt in two splits).

    All splits share one population of users: the emails task is to write the replies of known
    owners; records validation/test ask new facts (never seen in training).
    """
    for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} must be an integer >= 0")
    recs = generate(
        dataset, num_records=num_train + num_val + num_test, seed=seed, num_users=num_users
    )
    return {
        "train": recs[:num_train],
        "validation": recs[num_train : num_train + num_val],
        "test": recs[num_train + num_val :],
    }


def plant_canaries(
    records: list[dict[str, Any]],
    *,
    num_canaries: int,
    repetitions: int,
    seed: int,
    template: str = CANARY_TEMPLATE,
    prompt: str = CANARY_PROMPT,
    num_digits: int = 9,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Insert ``num_canaries`` random secrets, each repeated ``repetitions`` times.

    A canary is the record {prompt, response: template with a random ``num_digits``-digit
    secret, user: "canary-<i>"}; its copies go to random positions (the input list is not
    changed, other records keep their order). Each canary is its own user, so group-level DP
    covers all its copies; at example level each copy is its own unit (k-fold exposure).

    Returns:
        (records with canaries, metadata per canary: secret, prefix (template text before the
        secret: what an exposure audit conditions on), text, prompt, repetitions, user,
        num_digits (the secret space has 10**num_digits candidates)).
    """
    if isinstance(num_canaries, bool) or not isinstance(num_canaries, int) or num_canaries < 0:
        raise ValueError(f"num_canaries={num_canaries!r} must be an integer >= 0")
    if isinstance(repetitions, bool) or not isinstance(repetitions, int) or repetitions < 1:
        raise ValueError(
            f"repetitions={repetitions!r} (canary_repetitions) must be an integer >= 1"
        )
    if template.count("{secret}") != 1:
        raise ValueError(f"template={template!r} must contain '{{secret}}' exactly once")
    if not 1 <= num_digits <= 18 or 10**num_digits < num_canaries:
        raise ValueError(
            f"num_digits={num_digits} must be in [1, 18] with room for {num_canaries} secrets"
        )
    rng = random.Random(f"canary:{seed}")
    prefix = template.split("{secret}")[0]
    out, canaries, secrets_seen = list(records), [], set()
    for i in range(num_canaries):
        secret = f"{rng.randrange(10**num_digits):0{num_digits}d}"
        while secret in secrets_seen:
            secret = f"{rng.randrange(10**num_digits):0{num_digits}d}"
        secrets_seen.add(secret)
        text, user = template.replace("{secret}", secret), f"canary-{i}"
        canaries.append(
            {
                "secret": secret,
                "prefix": prefix,
                "text": text,
                "prompt": prompt,
                "repetitions": repetitions,
                "user": user,
                "num_digits": num_digits,
            }
        )
        for _ in range(repetitions):
            out.insert(rng.randint(0, len(out)), {"prompt": prompt, "response": text, "user": user})
    return out, canaries
