"""Package list for setuptools: the code packages, plus templates/ and static/ as portal data."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["portal", "portal.*", "notifier", "notifier.*",
                                      "migrations", "migrations.*"]),
              "portal.templates", "portal.static"],
    package_dir={"portal.templates": "templates", "portal.static": "static"},
)
