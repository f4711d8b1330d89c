"""Run a command under systemd's MemoryDenyWriteExecute=yes rule: ``python seccomp_mdwe.py CMD...``.

systemd 252 (Debian 12) implements that option as a seccomp filter, rebuilt here with
libseccomp through ctypes: mmap with PROT_WRITE and PROT_EXEC together, mprotect and
pkey_mprotect with PROT_EXEC, and shmat with SHM_EXEC fail with EPERM. The filter stays on
across exec, so the command and everything it starts run under it. Exit status 125: the filter
could not be installed (no libseccomp, or seccomp unavailable here).
"""

import ctypes
import ctypes.util
import errno
import mmap
import os
import sys

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO_BASE = 0x00050000  # SCMP_ACT_ERRNO(x) = base | x
SCMP_CMP_MASKED_EQ = 7  # (arg & datum_a) == datum_b
SHM_EXEC = 0o100000  # from linux/shm.h
CANNOT_INSTALL = 125


class ArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp."""
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


# (syscall, argument index, flags that must not all be set)
RULES = (
    ("mmap", 2, mmap.PROT_WRITE | mmap.PROT_EXEC),
    ("mprotect", 2, mmap.PROT_EXEC),
    ("pkey_mprotect", 2, mmap.PROT_EXEC),
    ("shmat", 2, SHM_EXEC),
)


def install():
    name = ctypes.util.find_library("seccomp")
    if name is None:
        raise OSError("libseccomp not found")
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)  # also sets no_new_privs, as NoNewPrivileges=yes
    if not ctx:
        raise OSError("seccomp_init failed")
    for syscall, arg, flags in RULES:
        number = lib.seccomp_syscall_resolve_name(syscall.encode())
        if number < 0:
            continue  # not on this architecture
        compare = ArgCmp(arg, SCMP_CMP_MASKED_EQ, flags, flags)
        result = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO_BASE | errno.EPERM, number, 1,
                                            ctypes.byref(compare))
        if result < 0:
            raise OSError(-result, "seccomp_rule_add %s: %s" % (syscall, os.strerror(-result)))
    result = lib.seccomp_load(ctx)
    if result < 0:
        raise OSError(-result, "seccomp_load: %s" % os.strerror(-result))


def main(argv):
    try:
        install()
    except OSError as exc:
        print("seccomp_mdwe: cannot install the filter: %s" % exc, file=sys.stderr)
        return CANNOT_INSTALL
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
