"""Package list for setuptools: the code packages, plus templates/, static/ and migrations/.

The three folders sit at the top of the checkout (the project's fixed layout) and are
installed inside the portal package, so a wheel adds no top-level ``migrations`` to
site-packages, a name other distributions use too. portal.paths finds either copy.
"""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(include=["portal", "portal.*", "notifier", "notifier.*"]),
        "portal.templates",
        "portal.static",
        "portal.migrations",
        "portal.migrations.versions",
    ],
    package_dir={
        "portal.templates": "templates",
        "portal.static": "static",
        "portal.migrations": "migrations",
        "portal.migrations.versions": "migrations/versions",
    },
)
