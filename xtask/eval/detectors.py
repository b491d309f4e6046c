"""The detectors' evaluation set: positives of each class cordon detects and
hard negatives that look like them, generated with Faker and a fixed seed.

Prints TSV lines: class, subtype, value. class "none" is a negative.
Half of the positives sit inside a sentence, as they do in free text.

    python3 detectors.py SEED POSITIVES_PER_CLASS NEGATIVES
"""

import base64
import hashlib
import json
import random
import string
import sys

from faker import Faker

seed, per_class, negatives = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
Faker.seed(seed)
rnd = random.Random(seed)
us = Faker("en_US")
multi = Faker(["en_US", "en_GB", "de_DE", "fr_FR", "nl_NL", "es_ES", "it_IT"])


def luhn_ok(digits):
    total = 0
    for i, d in enumerate(reversed([int(c) for c in digits])):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def luhn_complete(prefix, length):
    body = prefix + "".join(rnd.choice(string.digits) for _ in range(length - len(prefix) - 1))
    for check in string.digits:
        if luhn_ok(body + check):
            return body + check
    return body + "0"


def group(pan):
    """As printed on cards: 4-6-5 (15 digits), 4-6-4 (14), else fours."""
    if len(pan) in (14, 15):
        return f"{pan[:4]} {pan[4:10]} {pan[10:]}"
    return " ".join(pan[i : i + 4] for i in range(0, len(pan), 4))


def cards():
    faker_types = ["visa", "mastercard", "amex", "discover", "jcb16", "diners", "visa16", "visa19"]
    # Brands Faker does not make, by their IIN ranges.
    extra = [
        ("jcb", ["3528", "3545", "3589"], 16),
        ("unionpay", ["62", "6212", "6282"], 16),
        ("unionpay19", ["62"], 19),
        ("maestro", ["6759", "6761", "6763", "5018", "5020", "5038"], 16),
        ("mir", ["2200", "2201", "2202", "2203", "2204"], 16),
        ("rupay", ["60", "6521", "6522", "8171", "508"], 16),
        ("diners", ["36", "38", "39", "3095"], 14),
    ]
    while True:
        if rnd.random() < 0.5:
            t = rnd.choice(faker_types)
            try:
                pan = us.credit_card_number(card_type=t)
            except Exception:
                continue
            sub = t
        else:
            sub, prefixes, length = rnd.choice(extra)
            pan = luhn_complete(rnd.choice(prefixes), length)
        yield sub, group(pan) if rnd.random() < 0.5 else pan


def ssns():
    while True:
        yield "us", us.ssn()


def ibans():
    while True:
        v = multi.iban()
        yield v[:2], v if rnd.random() < 0.5 else " ".join(v[i : i + 4] for i in range(0, len(v), 4))


def emails():
    while True:
        yield "email", multi.email() if rnd.random() < 0.7 else multi.free_email()


def phones():
    formats = ["{a}-{e}-{n}", "({a}) {e}-{n}", "({a}){e}-{n}", "{a}.{e}.{n}", "+1 {a} {e} {n}", "+1-{a}-{e}-{n}"]
    while True:
        if rnd.random() < 0.6:
            a = f"{rnd.randint(2, 9)}{rnd.randint(0, 9)}{rnd.randint(0, 9)}"
            e = f"{rnd.randint(2, 9)}{rnd.randint(0, 9)}{rnd.randint(0, 9)}"
            n = f"{rnd.randint(0, 9999):04d}"
            yield "nanp", rnd.choice(formats).format(a=a, e=e, n=n)
        else:
            cc = rnd.choice(["44", "49", "33", "31", "34", "39", "61", "81", "91", "55"])
            digits = "".join(rnd.choice(string.digits) for _ in range(rnd.randint(8, 10)))
            digits = str(rnd.randint(1, 9)) + digits[1:]
            yield "e164", f"+{cc} {digits[:3]} {digits[3:6]} {digits[6:]}"


def ipv4s():
    while True:
        yield "ipv4", multi.ipv4(network=False)


def ipv6s():
    while True:
        yield "ipv6", multi.ipv6(network=False)


def aws_keys():
    alphabet = string.ascii_uppercase + "234567"
    while True:
        prefix = rnd.choice(["AKIA", "ASIA"])
        yield prefix.lower(), prefix + "".join(rnd.choice(alphabet) for _ in range(16))


POSITIVES = {
    "card": cards(),
    "ssn": ssns(),
    "iban": ibans(),
    "email": emails(),
    "phone": phones(),
    "ipv4": ipv4s(),
    "ipv6": ipv6s(),
    "aws_key": aws_keys(),
}

SENTENCES = [
    "please use {} for this one",
    "ref: {} (see ticket)",
    "customer said {}.",
    "{} -- updated by ops",
]


def bad_iban(v):
    last = v[-1]
    return v[:-1] + ("0" if last != "0" else "1")


def negatives_gen():
    kinds = [
        ("id", lambda: str(rnd.randint(10**5, 10**12))),
        ("order_no", lambda: f"ORD-{rnd.randint(10**7, 10**9)}"),
        ("ean13", lambda: us.ean13()),
        ("ean8", lambda: us.ean8()),
        ("isbn13", lambda: us.isbn13()),
        ("isbn10", lambda: us.isbn10()),
        ("epoch_ms", lambda: str(rnd.randint(946684800000, 2524608000000))),
        ("epoch_s", lambda: str(rnd.randint(946684800, 2524608000))),
        ("md5", lambda: us.md5()),
        ("sha1", lambda: us.sha1()),
        ("sha256", lambda: us.sha256()),
        ("uuid", lambda: us.uuid4()),
        ("version", lambda: f"{rnd.randint(0, 20)}.{rnd.randint(0, 40)}.{rnd.randint(0, 200)}"),
        ("date", lambda: us.date()),
        ("datetime", lambda: us.iso8601()),
        ("price", lambda: f"{rnd.randint(1, 99999)}.{rnd.randint(0, 99):02d}"),
        ("aws_example", lambda: "AKIA" + "".join(rnd.choice(string.ascii_uppercase) for _ in range(9)) + "EXAMPLE"),
        ("bad_iban", lambda: bad_iban(multi.iban())),
        ("words", lambda: us.sentence()),
        ("name", lambda: us.name()),
        ("address", lambda: us.address().replace("\n", ", ")),
        ("zip", lambda: us.postcode()),
        ("text_with_numbers", lambda: f"{us.word()} {rnd.randint(100, 99999)} {us.word()} {rnd.randint(10, 9999)}"),
        ("bad_luhn", lambda: (lambda p: p[:-1] + str((int(p[-1]) + 1) % 10))(us.credit_card_number())),
        ("public_key", lambda: "-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(rnd.randbytes(64)).decode() + "\n-----END PUBLIC KEY-----"),
        ("certificate", lambda: "-----BEGIN CERTIFICATE-----\n" + base64.b64encode(rnd.randbytes(96)).decode() + "\n-----END CERTIFICATE-----"),
        ("hex_blob", lambda: hashlib.sha512(rnd.randbytes(8)).hexdigest()),
        ("json", lambda: json.dumps({"id": rnd.randint(1, 10**9), "qty": rnd.randint(1, 99), "sku": us.bothify("??-#####")})),
        ("coordinates", lambda: f"{us.latitude()}, {us.longitude()}"),
        ("bad_ssn", lambda: rnd.choice(["000", "666", "9" + str(rnd.randint(10, 99))]) + f"-{rnd.randint(1, 99):02d}-{rnd.randint(1, 9999):04d}"),
    ]
    while True:
        sub, f = rnd.choice(kinds)
        yield sub, f()


out = sys.stdout
for cls, gen in POSITIVES.items():
    for _ in range(per_class):
        sub, v = next(gen)
        if rnd.random() < 0.5:
            v = rnd.choice(SENTENCES).format(v)
        out.write(f"{cls}\t{sub}\t{v}\n")
neg = negatives_gen()
for _ in range(negatives):
    sub, v = next(neg)
    v = v.replace("\t", " ").replace("\n", "\\n")
    out.write(f"none\t{sub}\t{v}\n")
