"""Whether this process can mount FUSE, said in one line. Its own module: `fs9 mount
--background` asks it before starting the server, and must not load the face (pyfuse3,
the kernel: a second interpreter's start-up) just to ask."""
import os
import shutil
import stat


def fuse_problem() -> str | None:
    """Why this process cannot mount FUSE, in one line, or None: checked before serving,
    so a machine without FUSE gets a sentence, not libfuse's traceback."""
    try:
        if not stat.S_ISCHR(os.stat("/dev/fuse").st_mode):
            return "/dev/fuse is not the FUSE device (a container without it?)"
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        return (f"cannot open /dev/fuse: {e.strerror} (apt-get install fuse3; in a "
                "container, pass the device: --device /dev/fuse)")
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        return "fusermount3 is missing (apt-get install fuse3), and mounting needs it unless root"
    return None
