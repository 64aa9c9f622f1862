"""A seeded multi-domain world with a planted cross-domain signal.

Every user has a latent taste: a sparse distribution over a few *themes*, shared by all domains. Every item
belongs to one domain and one theme, and its title carries the theme as a word (`Crimson Lamp No. 12` is a
theme-0 item of the domain whose noun is Lamp). A user's interactions pick a domain from the user's own
domain mix, a theme from the user's taste, and an item of that domain and theme by popularity; a fraction
`noise` of the interactions are uniform. So a model that learns "people who chose crimson things elsewhere
choose crimson things here" can recommend on a domain it never saw: the signal tests and experiments check.

The world streams: interactions are generated user by user and yielded, never held in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from cprec.errors import CPRecError

THEME_WORDS = [
    ["Crimson", "Scarlet", "Ruby", "Cherry"],
    ["Azure", "Cobalt", "Sapphire", "Navy"],
    ["Golden", "Amber", "Honey", "Saffron"],
    ["Emerald", "Jade", "Olive", "Mossy"],
    ["Silver", "Pewter", "Steel", "Chrome"],
    ["Violet", "Plum", "Lilac", "Orchid"],
    ["Ivory", "Pearl", "Snowy", "Linen"],
    ["Ebony", "Onyx", "Shadow", "Midnight"],
    ["Coral", "Salmon", "Peach", "Apricot"],
    ["Teal", "Aqua", "Lagoon", "Cyan"],
]
DOMAINS = [("Books", "Novel"), ("Movies", "Film"), ("Music", "Album"), ("Games", "Quest"), ("Toys", "Robot"),
           ("Garden", "Planter"), ("Kitchen", "Kettle"), ("Sports", "Racket"), ("Beauty", "Lotion"),
           ("Tools", "Wrench"), ("Office", "Stapler"), ("Pets", "Leash")]


@dataclass
class SyntheticConfig:
    users: int = 2000  # users in the world
    domains: int = 6  # domains (Books, Movies, ...)
    items_per_domain: int = 200  # items in each domain
    themes: int = 8  # latent tastes shared across domains: the planted cross-domain signal
    interactions_per_user: float = 40.0  # mean over all domains; at least 5 each
    domains_per_user: float = 0.5  # Dirichlet concentration of a user's domain mix (small = few domains)
    taste_concentration: float = 0.2  # Dirichlet concentration of a user's theme taste (small = sharp)
    noise: float = 0.1  # share of uniform random interactions
    popularity_skew: float = 1.0  # Zipf exponent of item popularity inside a (domain, theme)
    seed: int = 0  # the world is a pure function of its config
    domain_names: list[str] = field(default_factory=list)  # optional; defaults to Books, Movies, ...

    def validate(self) -> None:
        if not 1 <= self.domains <= len(DOMAINS):
            raise CPRecError(f"synthetic.domains must be between 1 and {len(DOMAINS)}, got {self.domains}")
        if not 1 <= self.themes <= len(THEME_WORDS):
            raise CPRecError(f"synthetic.themes must be between 1 and {len(THEME_WORDS)}, got {self.themes}")
        if self.items_per_domain < self.themes:
            raise CPRecError("synthetic.items_per_domain must be at least synthetic.themes")
        if self.domain_names and len(self.domain_names) != self.domains:
            raise CPRecError("synthetic.domain_names must name exactly synthetic.domains domains")
        if not 0.0 <= self.noise <= 1.0:
            raise CPRecError(f"synthetic.noise must be in [0, 1], got {self.noise}")


class SyntheticWorld:
    name = "synthetic"

    def __init__(self, config: SyntheticConfig):
        config.validate()
        self.config = c = config
        rng = np.random.default_rng([c.seed, 0])
        self.domain_names = list(c.domain_names) or [name for name, _ in DOMAINS[:c.domains]]
        nouns = [noun for _, noun in DOMAINS[:c.domains]]
        # item j of domain d has theme item_theme[d, j]; items of one theme are ranked by popularity
        self.item_theme = np.stack([rng.permutation(np.arange(c.items_per_domain) % c.themes)
                                    for _ in range(c.domains)])
        self.titles = []
        for d in range(c.domains):
            words = rng.integers(0, 4, size=c.items_per_domain)
            self.titles.append([f"{THEME_WORDS[t][w]} {nouns[d]} No. {j + 1}"
                                for j, (t, w) in enumerate(zip(self.item_theme[d], words))])
        self.pool = {}  # (domain, theme) -> (item indices, cumulative popularity)
        for d in range(c.domains):
            for t in range(c.themes):
                members = np.flatnonzero(self.item_theme[d] == t)
                weights = 1.0 / np.arange(1, len(members) + 1) ** c.popularity_skew
                self.pool[(d, t)] = (members, np.cumsum(weights) / weights.sum())

    def files(self) -> list[str]:
        return [f"synthetic(seed={self.config.seed})"]

    def item_key(self, d: int, j: int) -> str:
        return f"{self.domain_names[d]}-{j + 1}"

    def items(self, log):
        source = self.files()[0]
        line = 0
        for d, name in enumerate(self.domain_names):
            for j, title in enumerate(self.titles[d]):
                line += 1
                yield source, line, self.item_key(d, j), title, name
        log.count_read(source, line)

    def user_taste(self, u: int) -> np.ndarray:
        c = self.config
        return np.random.default_rng([c.seed, 1, u]).dirichlet(np.full(c.themes, c.taste_concentration))

    def interactions(self, log):
        c = self.config
        source = self.files()[0]
        line = 0
        for u in tqdm(range(c.users), desc="synthetic users", unit=" users", leave=False, mininterval=1.0):
            rng = np.random.default_rng([c.seed, 2, u])
            taste = self.user_taste(u)
            domain_mix = rng.dirichlet(np.full(c.domains, c.domains_per_user))
            n = 5 + rng.poisson(max(c.interactions_per_user - 5, 0))
            domains = rng.choice(c.domains, size=n, p=domain_mix)
            themes = rng.choice(c.themes, size=n, p=taste)
            noisy = rng.random(n) < c.noise
            uniform = rng.integers(0, c.items_per_domain, size=n)
            draws = rng.random(n)
            stamps = 1_600_000_000 + rng.integers(0, 10**7) + np.cumsum(rng.integers(1, 86_400, size=n))
            user = f"user{u + 1}"
            for i in range(n):
                d = int(domains[i])
                if noisy[i]:
                    j = int(uniform[i])
                else:
                    members, cum = self.pool[(d, int(themes[i]))]
                    j = int(members[min(np.searchsorted(cum, draws[i]), len(members) - 1)])
                line += 1
                yield source, line, user, self.item_key(d, j), float(stamps[i]), self.domain_names[d]
        log.count_read(source, line)
