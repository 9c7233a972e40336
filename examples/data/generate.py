"""Regenerates the quickstart's three client datasets (non-IID: each silo writes about other things).

Run `python examples/data/generate.py`; the output is committed, so a run needs nothing generated.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
N = 400


def clinic(rng: random.Random) -> dict[str, str]:
    age = rng.randint(18, 90)
    sex = rng.choice(["male", "female"])
    symptom = rng.choice(["chest pain", "fever", "persistent cough", "headache", "shortness of breath", "back pain"])
    days = rng.randint(1, 14)
    bp = f"{rng.randint(100, 170)}/{rng.randint(60, 100)}"
    plan = rng.choice(
        ["ECG and troponin ordered", "chest x-ray ordered", "paracetamol and rest", "follow-up in one week"]
    )
    return {"text": f"Patient, {age}-year-old {sex}, presents with {symptom} for {days} days. BP {bp}. Plan: {plan}."}


def bank(rng: random.Random) -> dict[str, str]:
    amount = rng.randint(5, 5000)
    merchant = rng.choice(["GROCERY MART", "FUEL STATION", "ONLINE STORE", "AIRLINE", "RESTAURANT", "PHARMACY"])
    country = rng.choice(["DE", "FR", "US", "JP", "BR"])
    risky = amount > 2000 and country in {"BR", "JP"}
    return {
        "prompt": f"Classify the card transaction: {amount} EUR at {merchant} in {country}.",
        "response": "Flag for review: high amount abroad." if risky else "Approve: matches usual spending.",
    }


def devops(rng: random.Random) -> dict[str, str]:
    svc = rng.choice(["api-gateway", "payments", "search", "auth", "billing", "ingest"])
    err = rng.choice(["5xx rate above 2%", "p99 latency over 800ms", "pod OOMKilled", "disk usage at 91%"])
    fix = rng.choice(
        [
            "rolled back the last deploy",
            "scaled replicas from 3 to 6",
            "raised the memory limit",
            "rotated logs",
        ]
    )
    return {"text": f"INCIDENT {svc}: {err}. Mitigation: {fix}. Status: resolved after {rng.randint(3, 90)} minutes."}


def main() -> None:
    for name, make in (("clinic", clinic), ("bank", bank), ("devops", devops)):
        rng = random.Random(name)
        lines = [json.dumps(make(rng)) for _ in range(N)]
        (HERE / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
