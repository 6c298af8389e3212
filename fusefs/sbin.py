"""The programs mount(8), umount(8), mkfs(8) and fsck(8) run for a fusefs image.

Every Linux filesystem is reached the same way: ``mount -t TYPE`` (or an
``/etc/fstab`` line) runs ``/sbin/mount.TYPE SOURCE DIR [-sfnv] [-o OPTIONS]``,
``umount`` runs ``/sbin/umount.TYPE DIR`` when it exists, ``mkfs -t TYPE`` runs
``mkfs.TYPE [OPTIONS] DEVICE [SIZE]`` and ``fsck -t TYPE`` runs ``fsck.TYPE
[-a|-p|-n|-y|-f...] DEVICE``.  A FUSE filesystem's type is ``fuse.SUBTYPE``
(``fuse.fusefs`` here, what /proc/mounts shows): mount(8) runs
``mount.fuse.fusefs`` if it exists, else the FUSE helper ``mount.fuse3``, which
runs the program named after the subtype as ``fusefs SOURCE DIR -o OPTIONS``
(`fusefs.cli.main` takes that form as ``fusefs mount``).

The entry points below are console scripts of the package; ``scripts/setup``
links them into /usr/sbin (which /sbin is on merged-/usr systems):

``mount.fuse.fusefs``, ``mount.fusefs``
    ``fusefs mount``: returns once the mount is ready.  ``-o`` passes through
    (ro, cache_size=..., commit=..., nosuid...); options only mount(8) and fstab
    care about (defaults, noauto, nofail, _netdev, x-*) are dropped.  ``-f``
    (fake) checks the arguments and mounts nothing; ``-n`` (no mtab) and ``-v``
    are accepted; ``-s`` (sloppy) drops unknown options instead of failing.
``umount.fuse.fusefs``
    ``fusefs umount``: waits for the daemon's final commit; ``-l`` (lazy)
    detaches at once with ``fusermount3 -u -z``.
``mkfs.fusefs [-b BLOCK_SIZE] [-F] [-v] IMAGE [SIZE]``
    ``fusefs mkfs``.  SIZE as mke2fs reads it: with a unit (``64M``), or a bare
    number of KiB (of blocks with ``-b``); without SIZE, the image file's
    current size.  ``-F`` is ``--force``.
``fsck.fusefs [-a|-p|-y|-n] [-f] [-v] IMAGE``
    ``fusefs fsck``, exit codes as e2fsck.  ``-a``, ``-p`` and ``-y`` repair,
    ``-n`` only checks (the default), ``-f`` is accepted (every check is full).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import NoReturn

from fusefs import cli
from fusefs.errors import FsError


def _usage_error(prog: str, message: str, code: int) -> NoReturn:
    print(f"{prog}: {message}", file=sys.stderr)
    sys.exit(code)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    return parser.parse_args(list(sys.argv[1:] if argv is None else argv))


# mount:


def mount_main(argv: Sequence[str] | None = None) -> int:
    """``mount.fuse.fusefs SOURCE DIR [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]``."""
    prog = os.path.basename(sys.argv[0]) or "mount.fuse.fusefs"
    parser = argparse.ArgumentParser(prog=prog, description="mount(8) helper for fusefs")
    parser.add_argument("source", help="the image file")
    parser.add_argument("mountpoint")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS")
    parser.add_argument("-t", dest="type", metavar="TYPE")
    parser.add_argument("-s", dest="sloppy", action="store_true", help="drop unknown options")
    parser.add_argument("-f", dest="fake", action="store_true", help="check, mount nothing")
    parser.add_argument("-n", dest="no_mtab", action="store_true", help="(no mtab is kept)")
    parser.add_argument("-v", dest="verbose", action="store_true")
    parser.add_argument("-N", dest="namespace", metavar="NS")
    args = _parse(parser, argv)
    if args.type not in (None, "fusefs", "fuse.fusefs"):
        _usage_error(prog, f"filesystem type {args.type!r} is not fusefs", 32)
    if args.namespace is not None:
        _usage_error(prog, "mount namespaces (-N) are not supported", 32)
    options = ",".join(args.options)
    if args.sloppy:
        options = _known_options(options)
    command = ["mount", args.source, args.mountpoint, "-o", options]
    if args.verbose:
        print(f"{prog}: fusefs {' '.join(command)}", file=sys.stderr)
    if args.fake:
        return _check_only(command)
    # mount(8) reads 32 as "mount failure".
    return 32 if cli.main(command) else 0


def _known_options(text: str) -> str:
    """-s: ``text`` without the options fusefs does not know."""
    from fusefs.filesystem import MountOptions

    kept = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            MountOptions.parse(cli.split_options(item)[1])
        except FsError:
            continue
        kept.append(item)
    return ",".join(kept)


def _check_only(command: list[str]) -> int:
    """-f: everything but the mount (the options parse, the paths are usable)."""
    from fusefs.filesystem import MountOptions

    _, source, mountpoint, _, options = command
    try:
        MountOptions.parse(cli.split_options(options)[1])
        args = argparse.Namespace(image=os.path.abspath(source), mountpoint=mountpoint)
        cli.check_mount_args(args)
    except (cli.CliError, FsError) as e:
        print(f"fusefs mount: {e}", file=sys.stderr)
        return 32
    return 0


def umount_main(argv: Sequence[str] | None = None) -> int:
    """``umount.fuse.fusefs DIR [-nlfvr] [-t TYPE]``."""
    prog = os.path.basename(sys.argv[0]) or "umount.fuse.fusefs"
    parser = argparse.ArgumentParser(prog=prog, description="umount(8) helper for fusefs")
    parser.add_argument("mountpoint")
    parser.add_argument("-t", dest="type", metavar="TYPE")
    parser.add_argument("-l", dest="lazy", action="store_true", help="detach at once")
    for flag in ("-n", "-f", "-v", "-r"):
        parser.add_argument(flag, action="store_true")
    args = _parse(parser, argv)
    if args.lazy:
        done = subprocess.run(["fusermount3", "-u", "-z", args.mountpoint], check=False)
        return 0 if done.returncode == 0 else 32
    return 32 if cli.main(["umount", args.mountpoint]) else 0


# mkfs:


def mkfs_main(argv: Sequence[str] | None = None) -> int:
    """``mkfs.fusefs [-b BLOCK_SIZE] [-F] [-v] IMAGE [SIZE]``."""
    from fusefs.format import parse_size

    prog = os.path.basename(sys.argv[0]) or "mkfs.fusefs"
    parser = argparse.ArgumentParser(prog=prog, description="mkfs(8) helper for fusefs")
    parser.add_argument("image")
    parser.add_argument(
        "size",
        nargs="?",
        help="with a unit (64M, 1G), or KiB (blocks with -b); default: the file's size",
    )
    parser.add_argument("-b", dest="block_size", type=int, help="bytes per block (4096)")
    parser.add_argument("-F", dest="force", action="store_true", help="overwrite data")
    parser.add_argument("-v", "-V", dest="verbose", action="store_true")
    args = _parse(parser, argv)
    block_size = args.block_size or 4096
    if args.size is None:
        try:
            size = os.stat(args.image).st_size
        except OSError:
            size = 0
        if size == 0:
            _usage_error(prog, f"{args.image}: give a size (the file is empty or missing)", 1)
    elif args.size.isdigit():
        size = int(args.size) * (block_size if args.block_size else 1024)
    else:
        try:
            size = parse_size(args.size)
        except FsError as e:
            _usage_error(prog, str(e), 1)
    command = ["mkfs", args.image, "--size", str(size), "--block-size", str(block_size)]
    if args.force:
        command.append("--force")
    if args.verbose:
        print(f"{prog}: fusefs {' '.join(command)}", file=sys.stderr)
    return cli.main(command)


# fsck:


def fsck_main(argv: Sequence[str] | None = None) -> int:
    """``fsck.fusefs [-a|-p|-y|-n] [-f] [-v] [-C FD] IMAGE``, as fsck(8) runs it."""
    prog = os.path.basename(sys.argv[0]) or "fsck.fusefs"
    parser = argparse.ArgumentParser(prog=prog, description="fsck(8) helper for fusefs")
    parser.add_argument("image")
    parser.add_argument("-a", dest="repair", action="store_true", help="repair (as -p)")
    parser.add_argument("-p", dest="repair", action="store_true", help="repair what is safe")
    parser.add_argument("-y", dest="repair", action="store_true", help="repair everything")
    parser.add_argument("-n", dest="check_only", action="store_true", help="check only")
    parser.add_argument("-f", dest="force", action="store_true", help="(every check is full)")
    parser.add_argument("-v", "-V", dest="verbose", action="store_true")
    parser.add_argument("-C", dest="progress_fd", metavar="FD", help="(no progress is shown)")
    args = _parse(parser, argv)
    if args.repair and args.check_only:
        _usage_error(prog, "-n cannot be given with -a, -p or -y", 16)  # e2fsck: usage error
    command = ["fsck", args.image]
    if args.repair:
        command.append("--repair")
    return cli.main(command)


__all__ = ["fsck_main", "mkfs_main", "mount_main", "umount_main"]
