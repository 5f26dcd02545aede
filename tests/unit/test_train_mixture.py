"""Default model v3's corpus: permissive packages found from their metadata, near-duplicates
dropped with held-out files winning, the held-out hash extended to package files."""
from __future__ import annotations

import email.message
import textwrap
from pathlib import Path

import pytest

from serve_app.train.corpus import CorpusConfig, is_heldout
from serve_app.train.dedupe import DedupeConfig, near_duplicates
from serve_app.train.mixture import MixtureConfig, load_mixture
from serve_app.train.packages import PackageConfig, licence_of, load_packages, spdx_permissive


def _meta(**fields) -> email.message.Message:
    msg = email.message.Message()
    for key, value in fields.items():
        for v in value if isinstance(value, list) else [value]:
            msg[key.replace("_", "-")] = v
    return msg


@pytest.mark.parametrize("expression, expected", [
    ("MIT", "MIT"),
    ("Apache-2.0 OR BSD-2-Clause", "Apache-2.0"),
    ("(BSD-3-Clause OR GPL-2.0-only)", "BSD-3-Clause"),
    ("Apache-2.0 AND MIT", "Apache-2.0 AND MIT"),
    ("Apache-2.0 WITH LLVM-exception AND MIT", "Apache-2.0 AND MIT"),
    ("BSD-3-Clause AND 0BSD AND MIT AND Zlib AND CC0-1.0", None),      # numpy: Zlib, CC0 not listed
    ("Apache-2.0 AND BSL-1.0", None),                                 # torch's bundled Boost code
    ("MPL-2.0", None),
    ("GPL-3.0-or-later", None),
])
def test_spdx_expressions_need_an_alternative_made_only_of_permissive_ids(expression, expected):
    assert spdx_permissive(expression) == expected


def test_licence_comes_from_the_expression_then_classifiers_then_a_short_field():
    assert licence_of(_meta(License_Expression="MIT", License="GPL")) == "MIT"
    assert licence_of(_meta(License_Expression="LGPL-2.1", Classifier="License :: OSI Approved :: MIT License")) is None
    assert licence_of(_meta(Classifier=["License :: OSI Approved :: BSD License",
                                        "License :: OSI Approved :: Apache Software License"])) == "BSD-3-Clause OR Apache-2.0"
    assert licence_of(_meta(Classifier=["License :: OSI Approved :: MIT License",
                                        "License :: OSI Approved :: GNU General Public License (GPL)"])) is None
    assert licence_of(_meta(License="Apache 2.0")) == "Apache-2.0"
    assert licence_of(_meta(License="PSF")) == "PSF-2.0"
    assert licence_of(_meta(License="ISC License (ISCL)")) == "ISC"
    assert licence_of(_meta(License="Proprietary")) is None
    assert licence_of(_meta(License="Copyright (c) 2020\nPermission is hereby granted...")) is None
    assert licence_of(_meta()) is None


CODE = textwrap.dedent('''\
    def area(width, height):
        """The area of a rectangle."""
        if width < 0 or height < 0:
            raise ValueError("negative side")
        result = width * height
        return result


    def perimeter(width, height):
        total = 2 * (width + height)
        return total
    ''')


def _dist(site: Path, name: str, version: str, files: dict[str, str], **meta) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = [f"Metadata-Version: 2.4", f"Name: {name}", f"Version: {version}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in meta.items()]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    record = [f"{rel},," for rel in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")


def test_packages_keep_permissive_source_and_skip_vendored_generated_and_other_licences(tmp_path):
    site = tmp_path / "site"
    _dist(site, "goodpkg", "1.2", {"goodpkg/__init__.py": CODE, "goodpkg/_vendor/six.py": CODE + "x = 1\n",
                                   "goodpkg/msg_pb2.py": "X = 1\n", "goodpkg/gen.py": "# DO NOT EDIT\nY = 2\n",
                                   "goodpkg/broken.py": "def (:\n", "goodpkg/data.txt": "not python"},
          License_Expression="MIT")
    _dist(site, "gplpkg", "0.1", {"gplpkg/__init__.py": CODE}, License_Expression="GPL-3.0-only")
    files, manifest = load_packages(PackageConfig(paths=(str(site),)))
    assert [f.rel_name for f in files] == ["pkg/goodpkg/goodpkg/__init__.py"]
    assert files[0].text == CODE
    assert [(p.name, p.version, p.licence, p.files) for p in manifest] == [("goodpkg", "1.2", "MIT", 1)]


def test_a_package_contributes_at_most_its_byte_cap(tmp_path):
    site = tmp_path / "site"
    _dist(site, "big", "1", {f"big/m{i}.py": CODE.replace("area", f"area{i}") for i in range(6)},
          License="MIT")
    files, manifest = load_packages(PackageConfig(paths=(str(site),), max_package_bytes=3 * len(CODE) + 10))
    assert len(files) == 3 and manifest[0].chars <= 3 * len(CODE) + 10


def _variant(i: int, lines: int = 40) -> str:
    return "".join(f"value_{i}_{j} = compute({j}, {i})\n" for j in range(lines))


def test_near_duplicates_are_found_and_the_first_copy_is_kept():
    base = _variant(0)
    edited = base.replace("value_0_3 ", "renamed ").replace("value_0_7 ", "other ")   # 2 of 40 lines changed
    texts = [base, _variant(1), edited, _variant(2), "a = 1\n"]
    assert near_duplicates(texts) == [None, None, 0, None, None]
    # Order decides who stays: the edited copy first keeps it and drops the original.
    assert near_duplicates([edited, base]) == [None, 0]
    # Half the lines shared is not a duplicate at the default threshold.
    half = "".join(base.splitlines(keepends=True)[:20]) + _variant(3, 20)
    assert near_duplicates([base, half]) == [None, None]
    # J = 20/60 here; one-row bands propose every pair that shares a minimum, and 0.2 accepts it.
    assert near_duplicates([base, half], DedupeConfig(threshold=0.2, bands=64)) == [None, 0]


def _heldout_name(prefix: str, want: bool) -> str:
    return next(f"{prefix}{i}.py" for i in range(100000) if is_heldout(f"{prefix}{i}.py", 30) == want)


def test_mixture_drops_training_copies_of_heldout_files_and_holds_out_package_files_by_hash(tmp_path):
    stdlib = tmp_path / "stdlib"
    held, trained = _heldout_name("mod", True), _heldout_name("mod", False)
    for name, text in ((held, _variant(10)), (trained, _variant(11))):
        (stdlib / name).parent.mkdir(parents=True, exist_ok=True)
        (stdlib / name).write_text(text)
    site = tmp_path / "site"
    copy = _variant(10).replace("value_10_5 ", "changed ")                # a near copy of the held-out file
    pkg_held = _heldout_name("pkg/p/p/h", True)[len("pkg/p/"):]
    _dist(site, "p", "1", {"p/copy.py": copy, "p/own.py": _variant(12), "p/exact.py": _variant(11),
                           pkg_held: _variant(13)}, License="BSD")
    mix = load_mixture(MixtureConfig(corpus=CorpusConfig(root=stdlib), packages=PackageConfig(paths=(str(site),))))
    assert [f.rel_name for f in mix.heldout] == [held]
    assert sorted(f.rel_name for f in mix.train) == sorted([trained, "pkg/p/p/own.py"])
    assert [f.rel_name for f in mix.heldout_packages] == [f"pkg/p/{pkg_held}"]
    assert mix.dropped_exact == 1 and mix.dropped_near == 1
    assert [p.name for p in mix.packages] == ["p"]
