"""Malware scanning through a real clamd (INSTREAM over its socket): what it finds, and how the
client fails closed when clamd is down, hangs, hangs up or cannot scan the whole file."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from portal.security import attachments, content_types
from portal.security.scan import (
    CHUNK_SIZE,
    ClamdAddress,
    NotScanning,
    Scanner,
    ScanRefused,
    ScanResult,
    ScanStream,
    Timeouts,
    Verdict,
    parse_reply,
)
from tests.support import samples
from tests.support.clamd import EICAR, SIGNATURE, Clamd, SilentScanner, free_port

MIB = 1024 * 1024
QUICK = Timeouts(connect=2.0, send=0.5, verdict=0.5)  # for the scanners that never answer

INFECTED_FILES = {
    "raw": lambda: EICAR,
    "pdf-embedded-file": lambda: samples.pdf(attachment=EICAR),
    "pdf-page-content": lambda: samples.pdf_with_content(b"% " + EICAR + b"\n"),
    "pdf-flate-stream": lambda: samples.pdf_with_flate_stream(EICAR),
    "appended-to-jpeg": lambda: samples.jpeg() + EICAR,
    "appended-to-png": lambda: samples.png() + EICAR,
    "in-jpeg-exif": lambda: samples.jpeg(exif=_exif_with(EICAR)),
}
CLEAN_FILES = {
    "pdf": lambda: samples.pdf(pages=3),
    "jpeg": lambda: samples.jpeg(exif=samples.gps_exif().tobytes()),
    "png": samples.png,
    "heic": samples.heic,
    "empty": lambda: b"",
    "random-2mib": lambda: os.urandom(2 * MIB),
    "eicar-cut-short": lambda: EICAR[:-1],
}


def _exif_with(text: bytes) -> bytes:
    exif = samples.gps_exif()
    exif[0x010E] = text.decode()  # ImageDescription
    return exif.tobytes()


def _feed_all(scanner: Scanner, chunks: list[bytes]) -> ScanResult:
    """Scan through the inspector interface; return the result or the refusal's result."""
    try:
        with scanner.open() as stream:
            for chunk in chunks:
                stream.feed(chunk)
            return stream.finish()
    except ScanRefused as refused:
        return refused.result


def _refusal(stream: ScanStream, chunks: Iterable[bytes], *, finish: bool) -> ScanRefused:
    """Feed ``chunks`` (then finish, if asked) and return the refusal; fail if none comes."""
    try:
        for chunk in chunks:
            stream.feed(chunk)
        if finish:
            stream.finish()
    except ScanRefused as refused:
        return refused
    pytest.fail("the scan was not refused")


@pytest.mark.parametrize("name", sorted(INFECTED_FILES))
def test_eicar_is_found_infected(clamd: Clamd, name: str) -> None:
    data = INFECTED_FILES[name]()
    result = _feed_all(clamd.scanner(), [data])
    assert result.verdict is Verdict.INFECTED
    assert (result.signature or "").startswith(SIGNATURE)
    assert result.size == len(data)
    assert not result.accepted


@pytest.mark.parametrize("name", ["pdf-embedded-file", "pdf-flate-stream", "appended-to-jpeg"])
def test_infected_files_pass_the_content_check_so_the_scanner_is_what_refuses_them(
    name: str,
) -> None:
    data = INFECTED_FILES[name]()
    assert attachments.validate(io.BytesIO(data)).kind in content_types.ALL_KINDS


def test_an_infected_file_is_refused_at_finish_with_a_message_fit_to_show(clamd: Clamd) -> None:
    with clamd.scanner().open() as stream:
        stream.feed(samples.jpeg())
        stream.feed(EICAR)
        with pytest.raises(ScanRefused) as refused:
            stream.finish()
    assert refused.value.result.verdict is Verdict.INFECTED
    assert refused.value.reason == "infected"
    assert "virus" in refused.value.message
    assert SIGNATURE not in refused.value.message  # the uploader learns no scanner internals


@pytest.mark.parametrize("name", sorted(CLEAN_FILES))
def test_clean_files_are_clean(clamd: Clamd, name: str) -> None:
    data = CLEAN_FILES[name]()
    result = _feed_all(clamd.scanner(), [data])
    assert result == ScanResult(Verdict.CLEAN, len(data))
    assert result.accepted


@pytest.mark.parametrize("cut", [1, 20, 34, 67])
def test_a_signature_split_between_chunks_is_still_found(clamd: Clamd, cut: int) -> None:
    data = b"%PDF-1.4\n" + EICAR + b"\n%%EOF\n"
    at = 9 + cut
    assert _feed_all(clamd.scanner(), [data[:at], data[at:]]).verdict is Verdict.INFECTED


def test_a_signature_fed_one_byte_at_a_time_is_still_found(clamd: Clamd) -> None:
    chunks = [bytes([byte]) for byte in EICAR]
    assert _feed_all(clamd.scanner(), chunks).verdict is Verdict.INFECTED


def test_a_signature_across_the_clients_own_chunk_boundary_is_found(clamd: Clamd) -> None:
    # One fed chunk, split by the client into CHUNK_SIZE pieces right inside the signature.
    data = b"\0" * (CHUNK_SIZE - 30) + EICAR + b"\0" * 100
    assert _feed_all(clamd.scanner(), [data]).verdict is Verdict.INFECTED


def test_empty_chunks_do_not_end_the_stream_early(clamd: Clamd) -> None:
    assert _feed_all(clamd.scanner(), [b"", b"abc", b"", EICAR]).verdict is Verdict.INFECTED


def test_clamd_over_tcp(clamd: Clamd) -> None:
    scanner = Scanner(ClamdAddress.parse(clamd.tcp_address))
    assert scanner.ping()
    assert scanner.scan([EICAR]).verdict is Verdict.INFECTED
    assert scanner.scan([samples.png()]).verdict is Verdict.CLEAN


def test_scans_at_once_each_get_their_own_verdict(clamd: Clamd) -> None:
    scanner = clamd.scanner()
    files = [EICAR if n % 2 else samples.jpeg() for n in range(12)]
    streams = [scanner.open() for _ in files]  # all open together, fed interleaved
    for half in (0, 1):
        for stream, data in zip(streams, files, strict=True):
            stream.feed(data[: len(data) // 2] if half == 0 else data[len(data) // 2 :])
    verdicts = [_finish(stream) for stream in streams]
    assert verdicts == [Verdict.INFECTED if n % 2 else Verdict.CLEAN for n in range(12)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        threaded = list(pool.map(lambda data: scanner.scan([data]).verdict, files))
    assert threaded == verdicts


def _finish(stream: ScanStream) -> Verdict:
    try:
        return stream.finish().verdict
    except ScanRefused as refused:
        return refused.result.verdict


def test_clamd_down_refuses_before_reading_the_upload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scanner = Scanner(ClamdAddress(path=str(tmp_path / "no-clamd.sock")))
    with pytest.raises(ScanRefused) as refused:
        scanner.open()
    assert refused.value.result == ScanResult(Verdict.UNAVAILABLE, 0, reason="connect")
    assert "please try again later" in refused.value.message
    assert not scanner.ping()
    logged = [r for r in caplog.records if r.name == "portal.security.scan"]
    assert [(r.levelname, r.__dict__["reason"]) for r in logged] == [("WARNING", "connect")]


def test_nothing_listening_on_the_tcp_port_refuses() -> None:
    scanner = Scanner(ClamdAddress.parse(f"127.0.0.1:{free_port()}"))
    assert scanner.scan([samples.png()]) == ScanResult(Verdict.UNAVAILABLE, 0, reason="connect")


def test_a_clamd_that_dies_mid_upload_refuses(make_clamd: Callable[..., Clamd]) -> None:
    own = make_clamd()
    stream = own.scanner(timeouts=QUICK).open()
    stream.feed(samples.jpeg())
    own.stop()
    # The kernel may take a few chunks before it reports the hang-up.
    refused = _refusal(stream, (os.urandom(CHUNK_SIZE) for _ in range(64)), finish=True)
    assert refused.result.verdict is Verdict.UNAVAILABLE
    # A clamd shutting down hangs up, or first answers the stream with an error.
    assert refused.result.reason in {"connection-lost", "error-reply"}


def test_a_clamd_that_never_answers_times_out(
    silent_scanner: Callable[..., SilentScanner],
) -> None:
    server = silent_scanner(reads=True)
    stream = Scanner(server.address, timeouts=QUICK).open()
    stream.feed(EICAR)
    with pytest.raises(ScanRefused) as refused:
        stream.finish()
    assert refused.value.result == ScanResult(Verdict.UNAVAILABLE, len(EICAR), reason="timeout")
    assert server.connections == 1


def test_a_clamd_that_stops_reading_times_out_while_fed(
    silent_scanner: Callable[..., SilentScanner],
) -> None:
    server = silent_scanner(reads=False)
    stream = Scanner(server.address, timeouts=QUICK).open()
    # 16 MiB: far more than the socket buffers hold.
    refused = _refusal(stream, (bytes(CHUNK_SIZE) for _ in range(256)), finish=False)
    assert refused.result.verdict is Verdict.UNAVAILABLE
    assert refused.result.reason == "timeout"


def test_a_refused_stream_stays_refused(silent_scanner: Callable[..., SilentScanner]) -> None:
    stream = Scanner(silent_scanner(reads=True).address, timeouts=QUICK).open()
    with pytest.raises(ScanRefused) as first:
        stream.finish()
    with pytest.raises(ScanRefused) as again:
        stream.feed(b"more")
    assert again.value is first.value


def test_a_finished_stream_takes_no_more(clamd: Clamd) -> None:
    stream = clamd.scanner().open()
    stream.finish()
    with pytest.raises(RuntimeError):
        stream.feed(b"late")


def test_a_stream_longer_than_the_portal_allows_is_refused_unsent(clamd: Clamd) -> None:
    with clamd.scanner(max_bytes=1000).open() as stream:
        stream.feed(bytes(1000))
        with pytest.raises(ScanRefused) as refused:
            stream.feed(b"!")
    assert refused.value.result == ScanResult(Verdict.UNSCANNABLE, 1001, reason="size-limit")
    assert "could not be checked" in refused.value.message


def test_a_stream_longer_than_clamds_limit_is_refused(make_clamd: Callable[..., Clamd]) -> None:
    small = make_clamd(stream_max_length=MIB)
    assert small.scanner().scan([bytes(MIB)]).verdict is Verdict.CLEAN  # the limit itself fits
    result = small.scanner().scan(bytes(CHUNK_SIZE) for _ in range(2 * MIB // CHUNK_SIZE))
    assert result.verdict is Verdict.UNSCANNABLE
    assert result.reason == "size-limit"


def test_a_file_too_deep_to_scan_whole_is_unscannable_not_clean(clamd: Clamd) -> None:
    result = clamd.scanner().scan([samples.nested_zip(b"harmless", depth=20)])
    assert result.verdict is Verdict.UNSCANNABLE
    assert result.signature == "Heuristics.Limits.Exceeded.MaxRecursion"
    assert result.reason == "scanner-limits"


def test_not_scanning_counts_and_accepts() -> None:
    inspector = NotScanning()
    inspector.feed(EICAR)
    inspector.feed(b"1234")
    assert inspector.finish() == ScanResult(Verdict.NOT_SCANNED, len(EICAR) + 4)
    assert inspector.finish().accepted


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"stream: OK", ScanResult(Verdict.CLEAN, 5)),
        (
            b"stream: Win.Test.EICAR_HDB-1 FOUND",
            ScanResult(Verdict.INFECTED, 5, "Win.Test.EICAR_HDB-1"),
        ),
        (b"stream: Odd Name<script> FOUND", ScanResult(Verdict.INFECTED, 5, "Odd_Name_script_")),
        (
            b"INSTREAM size limit exceeded. ERROR",
            ScanResult(Verdict.UNSCANNABLE, 5, reason="size-limit"),
        ),
        (b"Can't allocate memory ERROR", ScanResult(Verdict.UNAVAILABLE, 5, reason="error-reply")),
        (b"UNKNOWN COMMAND", ScanResult(Verdict.UNAVAILABLE, 5, reason="bad-reply")),
        (b"", ScanResult(Verdict.UNAVAILABLE, 5, reason="bad-reply")),
        (b"stream: \xff\xfe FOUND", ScanResult(Verdict.INFECTED, 5, "__")),
    ],
)
def test_clamd_replies_are_read_fail_closed(reply: bytes, expected: ScanResult) -> None:
    assert parse_reply(reply, 5) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/run/clamav/clamd.ctl", ClamdAddress(path="/run/clamav/clamd.ctl")),
        (" 127.0.0.1:3310 ", ClamdAddress(host="127.0.0.1", port=3310)),
        ("clamav.internal:3310", ClamdAddress(host="clamav.internal", port=3310)),
        ("[::1]:3310", ClamdAddress(host="::1", port=3310)),
    ],
)
def test_addresses_parse(raw: str, expected: ClamdAddress) -> None:
    assert ClamdAddress.parse(raw) == expected


@pytest.mark.parametrize("raw", ["", "clamd", "run/clamd.ctl", "host:0", "host:99999", "a b:1"])
def test_bad_addresses_are_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="socket path"):
        ClamdAddress.parse(raw)
