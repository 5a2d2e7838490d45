"""Write the example federations of examples/ (small synthetic CSV files with string ids), the same bytes on every run.

    python scripts/make_examples.py [--out examples]

csv-pair: two domains (books, films) over the same 300 users. three-domains: books, films and
music over 360 users who are each in one, two or all three domains (partial overlap). Users
and items fall into taste groups, so that a model has something to learn; each user holds out
one test item per domain. Only numpy's seeded Generator draws (`random`, `integers`) are used.
"""

import argparse
from pathlib import Path

import numpy as np

GROUPS = 4
ON_TASTE_WEIGHT = 20.0  # how much likelier an item of the user's own taste group is than another as popular
ZIPF = 0.7  # popularity exponent: the item of popularity rank r is drawn with weight 1 / r^ZIPF


def _domain_rows(rng: np.random.Generator, users: np.ndarray, groups: np.ndarray, prefix: str, n_items: int,
                 per_user: int) -> tuple[list[str], list[str]]:
    """Train and test CSV lines of one domain: `per_user` distinct items per user, the last one held out."""
    item_groups = np.arange(n_items) % GROUPS
    # Zipf-like popularity over a random order of the items
    popularity = 1.0 / (np.argsort(rng.random(n_items), kind="stable") + 1.0) ** ZIPF
    orders = []
    for group in groups:
        # weighted draw without replacement (Efraimidis-Spirakis keys): popular, on-taste items first
        weights = popularity * np.where(item_groups == group, ON_TASTE_WEIGHT, 1.0)
        orders.append(np.argsort(-np.log(1.0 - rng.random(n_items)) / weights, kind="stable"))
    trained = np.zeros(n_items, dtype=bool)
    for order in orders:
        trained[order[: per_user - 1]] = True
    # every item is trained on by someone (the catalog is the items of train, and the protocols
    # draw up to 999 negatives from it): each item nobody chose goes to one user drawn at random
    extra: list[list[int]] = [[] for _ in orders]
    for item in np.flatnonzero(~trained):
        extra[int(rng.integers(0, len(orders)))].append(int(item))
    trained[:] = True
    train, test = [], []
    for user, order, more in zip(users, orders, extra):
        name = f"user-{user:04d}"
        train += [f"{name},{prefix}-{item:04d}" for item in [*order[: per_user - 1], *more]]
        # the held-out item: the user's next choice (every item is in train, none twice for one user)
        rest = [item for item in order[per_user - 1 :] if item not in more]
        test.append(f"{name},{prefix}-{rest[0]:04d}")
    return train, test


def _write(folder: Path, domain: str, train: list[str], test: list[str]) -> None:
    """`DOMAIN_train.csv` and `DOMAIN_test.csv` with a `user,item` header."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{domain}_train.csv").write_text("user,item\n" + "\n".join(train) + "\n")
    (folder / f"{domain}_test.csv").write_text("user,item\n" + "\n".join(test) + "\n")


def make(out: Path) -> None:
    """Both example federations under `out`."""
    rng = np.random.default_rng(20240611)
    users = np.arange(300)
    groups = rng.integers(0, GROUPS, size=users.size)
    for domain, prefix, n_items in (("books", "bk", 1100), ("films", "fm", 1050)):
        _write(out / "csv-pair", domain, *_domain_rows(rng, users, groups, prefix, n_items, per_user=9))
    users = np.arange(360)
    groups = rng.integers(0, GROUPS, size=users.size)
    # books: users 0-239, films: 120-359, music: 0-59 and 180-299; so 0-59 and 180-239 are in all three
    members = {"books": users < 240, "films": users >= 120, "music": (users < 60) | ((users >= 180) & (users < 300))}
    for domain, prefix, n_items in (("books", "bk", 1080), ("films", "fm", 1040), ("music", "mu", 1020)):
        inside = members[domain]
        _write(out / "three-domains", domain, *_domain_rows(rng, users[inside], groups[inside], prefix, n_items, per_user=8))


def main() -> None:
    """Parse --out and write the files."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "examples", help="folder to write into")
    make(parser.parse_args().out)


if __name__ == "__main__":
    main()
