/* Escape attempts of a confined fs9 agent, by raw syscalls (tests/test_escapes.py).
 *
 * Usage: escape NAME. Runs one attempt and prints, besides `STEP` lines that say
 * what each syscall returned, exactly one verdict line:
 *   DENIED NAME step:ERRNO ...   every step failed
 *   ESCAPED NAME step: detail    a step succeeded that must not (a security bug)
 * The paths and pids come from the environment: FS9_MNT (the mount point),
 * FS9_ROOT (the directory holding mnt/, state/, vault/, agents/), STATE, VAULT,
 * AGENTS, DAEMON (the fs9 server's pid), VICTIM (another agent's daemon's pid).
 * Syscalls go through syscall(2), not libc wrappers that might refuse early or
 * take another route (clone3, openat2).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *attempt;
static int escaped;
static char denials[4096];

static const char *ename(int e)
{
    const char *n = strerrorname_np(e);
    static char buf[16];
    if (n)
        return n;
    snprintf(buf, sizeof buf, "E%d", e);
    return buf;
}

static const char *env(const char *name)
{
    const char *v = getenv(name);
    if (!v || !*v) {
        printf("ERROR %s: %s not set\n", attempt, name);
        exit(2);
    }
    return v;
}

static pid_t pid_env(const char *name) { return (pid_t)atoi(env(name)); }

static void denied(const char *step, int err)
{
    size_t n = strlen(denials);
    snprintf(denials + n, sizeof denials - n, " %s:%s", step, ename(err));
    printf("STEP %s %s -> %s\n", attempt, step, ename(err));
}

static void got(const char *step, const char *detail)
{
    printf("ESCAPED %s %s: %s\n", attempt, step, detail);
    escaped = 1;
}

/* A step is one syscall: failed (denied) or not (got, with what it gave). */
static long step(const char *name, long r)
{
    if (r < 0)
        denied(name, errno);
    else {
        char d[64];
        snprintf(d, sizeof d, "returned %ld", r);
        got(name, d);
    }
    return r;
}

static void finish(void)
{
    if (!escaped)
        printf("DENIED %s%s\n", attempt, denials);
    fflush(stdout);
}

/* Read fd and report what it gave as an escape (the fd must not have opened). */
static void leak(const char *name, int fd)
{
    char buf[256] = {0};
    long n = read(fd, buf, sizeof buf - 1);
    for (long i = 0; i < n; i++)
        if (buf[i] == '\n' || buf[i] < ' ')
            buf[i] = ' ';
    got(name, n >= 0 ? buf : "opened (unreadable)");
    close(fd);
}

static long sys_open(int dirfd, const char *path, int flags)
{
    return syscall(SYS_openat, dirfd, path, flags, 0);
}

/* open a file: a success is an escape; its first bytes show what leaked */
static void try_open(const char *name, int dirfd, const char *path, int flags)
{
    long fd = sys_open(dirfd, path, flags);
    if (fd < 0)
        denied(name, errno);
    else
        leak(name, (int)fd);
}

/* open a directory and list it: a success is an escape */
static void try_list(const char *name, int dirfd, const char *path)
{
    long fd = sys_open(dirfd, path, O_RDONLY | O_DIRECTORY);
    if (fd < 0) {
        denied(name, errno);
        return;
    }
    DIR *d = fdopendir((int)fd);
    struct dirent *e;
    char names[512] = "listed:";
    while (d && (e = readdir(d)))
        if (strlen(names) + strlen(e->d_name) + 2 < sizeof names) {
            strcat(names, " ");
            strcat(names, e->d_name);
        }
    got(name, names);
    if (d)
        closedir(d);
}

static char *join(const char *a, const char *b)
{
    char *s;
    if (asprintf(&s, "%s%s", a, b) < 0)
        exit(3);
    return s;
}

/* ---- the attempts ------------------------------------------------------- */

/* An O_PATH fd of the real mount's parent (Landlock does not govern O_PATH),
 * then relative opens from it: the real mnt/ctl, the parent's listing, the state. */
static void opath_parent(void)
{
    long fd = sys_open(AT_FDCWD, env("FS9_ROOT"), O_PATH | O_DIRECTORY);
    if (fd < 0) {
        denied("open_opath_root", errno);
        return;
    }
    try_open("openat_mnt_ctl", (int)fd, "mnt/ctl", O_RDONLY);
    try_open("openat_mnt_victim_status", (int)fd, "mnt/agents/victim/status", O_RDONLY);
    try_list("openat_dot", (int)fd, ".");
    try_open("openat_state_db", (int)fd, "state/log.sqlite", O_RDONLY);
    if (syscall(SYS_fchdir, fd) == 0) { /* allowed for O_PATH: then relative paths */
        try_list("fchdir_list_dot", AT_FDCWD, ".");
        try_open("fchdir_open_state_db", AT_FDCWD, "state/log.sqlite", O_RDONLY);
    } else
        denied("fchdir", errno);
}

/* `..` of the mount point by an O_PATH fd: the parent's listing, the state beside it */
static void opath_dotdot(void)
{
    long fd = sys_open(AT_FDCWD, env("FS9_MNT"), O_PATH | O_DIRECTORY);
    if (fd < 0) {
        denied("open_opath_mnt", errno);
        return;
    }
    try_list("openat_dotdot", (int)fd, "..");
    try_open("openat_dotdot_state_db", (int)fd, "../state/log.sqlite", O_RDONLY);
    try_open("openat_dotdot_victim_def", (int)fd, "../agents/victim/agent.toml", O_RDONLY);
}

static void name_to_handle(void)
{
    struct { struct file_handle h; unsigned char f[128]; } fh = {.h.handle_bytes = 128};
    int mnt_id;
    step("name_to_handle_at_state", syscall(SYS_name_to_handle_at, AT_FDCWD, env("STATE"),
                                            &fh.h, &mnt_id, 0));
    step("name_to_handle_at_victim_def",
         syscall(SYS_name_to_handle_at, AT_FDCWD, join(env("AGENTS"), "/victim/agent.toml"),
                 &fh.h, &mnt_id, 0));
}

/* "shocker": a forged handle for inode 2 (the root of an ext4/xfs file system) */
static void open_by_handle(void)
{
    struct { struct file_handle h; uint32_t ino, gen; } fh = {
        .h.handle_bytes = 8, .h.handle_type = 1 /* FILEID_INO32_GEN */, .ino = 2, .gen = 0};
    long mfd = sys_open(AT_FDCWD, env("FS9_MNT"), O_PATH);
    long r = syscall(SYS_open_by_handle_at, mfd, &fh.h, O_RDONLY | O_DIRECTORY);
    if (r < 0)
        denied("open_by_handle_at_mnt", errno);
    else
        try_list("open_by_handle_at_mnt", (int)r, ".");
    mfd = sys_open(AT_FDCWD, "/", O_PATH);
    r = syscall(SYS_open_by_handle_at, mfd, &fh.h, O_RDONLY | O_DIRECTORY);
    if (r < 0)
        denied("open_by_handle_at_root", errno);
    else
        try_list("open_by_handle_at_root", (int)r, ".");
}

static void do_mount(void)
{
    char *dir = join(env("HOME"), "/m");
    mkdir(dir, 0700);
    step("mount_bind_state", syscall(SYS_mount, env("STATE"), dir, NULL, MS_BIND, NULL));
    step("mount_proc", syscall(SYS_mount, "proc", dir, "proc", 0, NULL));
    step("mount_fuse_again", syscall(SYS_mount, env("FS9_MNT"), dir, NULL, MS_BIND | MS_REC, NULL));
    step("fsopen_tmpfs", syscall(SYS_fsopen, "tmpfs", 0));
    step("open_tree_mnt", syscall(SYS_open_tree, AT_FDCWD, env("FS9_MNT"), 1 /* OPEN_TREE_CLONE */));
}

/* Take the view off the mount point: the full tree would be below it. */
static void do_umount(void)
{
    const char *mnt = env("FS9_MNT");
    if (syscall(SYS_umount2, mnt, MNT_DETACH) < 0)
        denied("umount2_detach", errno);
    else
        got("umount2_detach", "unmounted the view");
    if (syscall(SYS_umount2, mnt, 0) < 0)
        denied("umount2", errno);
    else
        got("umount2", "unmounted the view");
    try_open("open_mnt_ctl_after", AT_FDCWD, join(mnt, "/ctl"), O_RDONLY);
}

static void do_unshare(void)
{
    if (syscall(SYS_unshare, CLONE_NEWUSER | CLONE_NEWNS) < 0)
        denied("unshare_user_ns", errno);
    else {
        got("unshare_user_ns", "new user and mount namespaces");
        /* as root of the new user namespace: try to uncover the mount point */
        if (syscall(SYS_umount2, env("FS9_MNT"), MNT_DETACH) == 0)
            got("umount_in_userns", "unmounted the view");
    }
    step("unshare_user", syscall(SYS_unshare, CLONE_NEWUSER));
}

static void clone_newuser(void)
{
    long r = syscall(SYS_clone, CLONE_NEWUSER | CLONE_NEWNS | SIGCHLD, 0, 0, 0, 0);
    if (r == 0)
        _exit(0);
    if (r < 0)
        denied("clone_newuser_newns", errno);
    else {
        waitpid((pid_t)r, NULL, 0);
        got("clone_newuser_newns", "a child in new namespaces");
    }
    r = syscall(SYS_clone, CLONE_NEWPID | SIGCHLD, 0, 0, 0, 0);
    if (r == 0)
        _exit(0);
    if (r < 0)
        denied("clone_newpid", errno);
    else {
        waitpid((pid_t)r, NULL, 0);
        got("clone_newpid", "a child in a new pid namespace");
    }
}

static void do_setns(void)
{
    long fd = sys_open(AT_FDCWD, "/proc/1/ns/mnt", O_RDONLY);
    if (fd < 0)
        denied("open_init_mnt_ns", errno);
    else
        step("setns_init_mnt_ns", syscall(SYS_setns, fd, CLONE_NEWNS));
    char *p = join(join("/proc/", env("DAEMON")), "/ns/mnt");
    fd = sys_open(AT_FDCWD, p, O_RDONLY);
    if (fd < 0)
        denied("open_daemon_mnt_ns", errno);
    else
        step("setns_daemon_mnt_ns", syscall(SYS_setns, fd, CLONE_NEWNS));
    /* an fd we can open: the syscall itself must be refused */
    fd = sys_open(AT_FDCWD, "/proc/self/ns/mnt", O_RDONLY);
    if (fd < 0)
        denied("open_self_mnt_ns", errno);
    else
        step("setns_self_mnt_ns", syscall(SYS_setns, fd, CLONE_NEWNS));
}

static void do_ptrace(const char *who)
{
    pid_t pid = pid_env(who);
    if (pid <= 1) {
        printf("ERROR %s: no pid in %s\n", attempt, who);
        exit(2);
    }
    step("ptrace_attach", syscall(SYS_ptrace, PTRACE_ATTACH, pid, 0, 0));
    step("ptrace_seize", syscall(SYS_ptrace, PTRACE_SEIZE, pid, 0, 0));
}

static void do_pivot_root(void)
{
    char *root = join(env("HOME"), "/newroot"), *old = join(root, "/old");
    mkdir(root, 0700);
    mkdir(old, 0700);
    step("pivot_root_scratch", syscall(SYS_pivot_root, root, old));
    step("pivot_root_dot", syscall(SYS_pivot_root, ".", "."));
}

/* the classic chroot breakout: chroot into a subdirectory, then walk up */
static void do_chroot(void)
{
    char *dir = join(env("HOME"), "/jail");
    mkdir(dir, 0700);
    if (syscall(SYS_chroot, dir) < 0) {
        denied("chroot_scratch", errno);
        return;
    }
    got("chroot_scratch", "chrooted");
    for (int i = 0; i < 64; i++)
        chdir("..");
    syscall(SYS_chroot, ".");
}

static void vm_rw(const char *who, int write_it)
{
    pid_t pid = pid_env(who);
    char buf[64] = "fs9 escape test";
    struct iovec local = {buf, sizeof buf}, remote = {(void *)0x400000, sizeof buf};
    if (write_it)
        step("process_vm_writev", syscall(SYS_process_vm_writev, pid, &local, 1, &remote, 1, 0));
    else
        step("process_vm_readv", syscall(SYS_process_vm_readv, pid, &local, 1, &remote, 1, 0));
}

static void kill_victim(void)
{
    pid_t pid = pid_env("VICTIM");
    step("kill_sigkill", syscall(SYS_kill, pid, SIGKILL));
    step("tgkill_sigstop", syscall(SYS_tgkill, pid, pid, SIGSTOP));
    step("kill_pgrp", syscall(SYS_kill, -pid, SIGKILL)); /* it leads its session */
}

static void proc_mem_daemon(void)
{
    char *p = join(join("/proc/", env("DAEMON")), "/mem");
    long fd = sys_open(AT_FDCWD, p, O_RDWR);
    if (fd < 0)
        denied("open_mem_rw", errno);
    else {
        char x = 0;
        if (pwrite((int)fd, &x, 1, 0x400000) < 0)
            denied("pwrite_mem", errno);
        else
            got("pwrite_mem", "wrote the daemon's memory");
    }
    try_open("open_mem_ro", AT_FDCWD, p, O_RDONLY);
}

/* chdir through a held fd: the daemon's cwd, then relative opens */
static void proc_cwd_daemon(void)
{
    char *p = join(join("/proc/", env("DAEMON")), "/cwd");
    long fd = sys_open(AT_FDCWD, p, O_RDONLY | O_DIRECTORY);
    if (fd < 0)
        denied("open_daemon_cwd", errno);
    else if (syscall(SYS_fchdir, fd) < 0)
        denied("fchdir_daemon_cwd", errno);
    else
        try_list("fchdir_daemon_cwd", AT_FDCWD, ".");
    fd = sys_open(AT_FDCWD, p, O_PATH | O_DIRECTORY);
    if (fd < 0)
        denied("open_opath_daemon_cwd", errno);
    else if (syscall(SYS_fchdir, fd) < 0)
        denied("fchdir_opath_daemon_cwd", errno);
    else
        try_list("list_after_fchdir_opath", AT_FDCWD, ".");
}

/* the sandbox's own zygote (our parent, root in our namespace): its fds and root */
static void zygote_fds(void)
{
    char pid[16];
    snprintf(pid, sizeof pid, "%d", getppid());
    char *base = join("/proc/", pid);
    try_list("list_zygote_fds", AT_FDCWD, join(base, "/fd"));
    try_open("open_zygote_fd3", AT_FDCWD, join(base, "/fd/3"), O_RDWR);
    try_open("open_zygote_environ", AT_FDCWD, join(base, "/environ"), O_RDONLY);
}

/* Escape the task's process group and session, then reach for the state. */
static void doublefork_state(void)
{
    int p[2];
    if (pipe(p) < 0) {
        denied("pipe", errno);
        return;
    }
    pid_t child = fork();
    if (child == 0) {
        close(p[0]);
        setsid();
        if (fork() == 0) {
            dup2(p[1], 1);
            sleep(1); /* the middle process is gone: we are an orphan */
            try_list("orphan_list_state", AT_FDCWD, env("STATE"));
            try_open("orphan_open_state_db", AT_FDCWD, join(env("STATE"), "/log.sqlite"), O_RDONLY);
            printf("ORPHAN %d %s\n", escaped, denials);
            fflush(stdout);
            _exit(0);
        }
        _exit(0);
    }
    close(p[1]);
    waitpid(child, NULL, 0);
    char buf[4096] = {0};
    size_t got_n = 0;
    long n;
    while ((n = read(p[0], buf + got_n, sizeof buf - 1 - got_n)) > 0)
        got_n += n;
    printf("%s", buf);
    char *orphan = strstr(buf, "ORPHAN ");
    if (!orphan)
        got("orphan", "no report from the orphan");
    else if (orphan[7] != '0')
        escaped = 1; /* its ESCAPED lines are printed above */
    else {
        char *nl = strchr(orphan, '\n');
        if (nl)
            *nl = 0;
        strncat(denials, orphan + 9, sizeof denials - strlen(denials) - 1);
    }
}

static void do_bpf(void)
{
    union { struct { uint32_t type, key, value, max; } map; char pad[128]; } attr = {0};
    attr.map.type = 2; /* BPF_MAP_TYPE_ARRAY */
    attr.map.key = 4;
    attr.map.value = 4;
    attr.map.max = 1;
    step("bpf_map_create", syscall(SYS_bpf, 0 /* BPF_MAP_CREATE */, &attr, sizeof attr));
    step("perf_event_open", syscall(SYS_perf_event_open, &attr, 0, -1, -1, 0));
}

/* io_uring: openat done by the kernel on the ring's behalf, not by a syscall the
 * sandbox's seccomp filter or an audit exit rule sees */
static void do_io_uring(void)
{
    struct io_uring_params p = {0};
    long ring = syscall(SYS_io_uring_setup, 4, &p);
    if (ring < 0) {
        denied("io_uring_setup", errno);
        return;
    }
    printf("STEP %s io_uring_setup -> fd %ld\n", attempt, ring);
    size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    char *sq = mmap(0, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQ_RING);
    char *cq = mmap(0, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_CQ_RING);
    struct io_uring_sqe *sqes = mmap(0, p.sq_entries * sizeof *sqes, PROT_READ | PROT_WRITE,
                                     MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED) {
        denied("io_uring_mmap", errno);
        return;
    }
    const char *targets[][2] = {{"uring_open_state_db", join(env("STATE"), "/log.sqlite")},
                                {"uring_open_victim_def", join(env("AGENTS"), "/victim/agent.toml")},
                                {"uring_open_parent", env("FS9_ROOT")}};
    for (int i = 0; i < 3; i++) {
        unsigned *tail = (unsigned *)(sq + p.sq_off.tail), *mask = (unsigned *)(sq + p.sq_off.ring_mask);
        unsigned *array = (unsigned *)(sq + p.sq_off.array);
        unsigned idx = *tail & *mask;
        struct io_uring_sqe *e = &sqes[idx];
        memset(e, 0, sizeof *e);
        e->opcode = IORING_OP_OPENAT;
        e->fd = AT_FDCWD;
        e->addr = (uint64_t)(uintptr_t)targets[i][1];
        e->open_flags = O_RDONLY;
        array[idx] = idx;
        __atomic_store_n(tail, *tail + 1, __ATOMIC_RELEASE);
        long r = syscall(SYS_io_uring_enter, ring, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0);
        if (r < 0) {
            denied(targets[i][0], errno);
            continue;
        }
        unsigned *head = (unsigned *)(cq + p.cq_off.head), *cmask = (unsigned *)(cq + p.cq_off.ring_mask);
        struct io_uring_cqe *cqe = &((struct io_uring_cqe *)(cq + p.cq_off.cqes))[*head & *cmask];
        int res = cqe->res;
        __atomic_store_n(head, *head + 1, __ATOMIC_RELEASE);
        if (res < 0)
            denied(targets[i][0], -res);
        else
            leak(targets[i][0], res);
    }
}

static void proc_self_root_state(void)
{
    char *p = join("/proc/self/root", env("STATE"));
    try_list("list_proc_self_root_state", AT_FDCWD, p);
    try_open("open_proc_self_root_state_db", AT_FDCWD, join(p, "/log.sqlite"), O_RDONLY);
}

/* chmod and chown of a vault symlink itself (AT_SYMLINK_NOFOLLOW): the server must
 * not apply them to the symlink's target (the canary, root's, outside the vault) */
static void vault_chmod_symlink(void)
{
    char *link;
    if (asprintf(&link, "%s/vault/work/cs-%d", env("FS9_MNT"), getpid()) < 0)
        exit(3);
    char *target = join(env("FS9_ROOT"), "/canary/secret");
    if (syscall(SYS_symlinkat, target, AT_FDCWD, link) < 0) /* its own symlink: allowed */
        printf("STEP %s symlink -> %s\n", attempt, ename(errno));
#ifndef SYS_fchmodat2
#define SYS_fchmodat2 452
#endif
    step("fchmodat2_nofollow_0666", syscall(SYS_fchmodat2, AT_FDCWD, link, 0666, AT_SYMLINK_NOFOLLOW));
    step("fchownat_nofollow_root", syscall(SYS_fchownat, AT_FDCWD, link, 0, 0, AT_SYMLINK_NOFOLLOW));
    step("chmod_through_symlink", syscall(SYS_fchmodat, AT_FDCWD, link, 0666));
    try_open("open_through_symlink", AT_FDCWD, link, O_RDONLY);
}

static const struct {
    const char *name;
    void (*fn)(void);
} attempts[] = {
    {"opath_parent", opath_parent},
    {"opath_dotdot", opath_dotdot},
    {"name_to_handle", name_to_handle},
    {"open_by_handle", open_by_handle},
    {"mount", do_mount},
    {"umount", do_umount},
    {"unshare", do_unshare},
    {"clone_newuser", clone_newuser},
    {"setns", do_setns},
    {"ptrace_victim", NULL},
    {"ptrace_daemon", NULL},
    {"pivot_root", do_pivot_root},
    {"chroot", do_chroot},
    {"vm_readv_daemon", NULL},
    {"vm_writev_victim", NULL},
    {"kill_victim", kill_victim},
    {"proc_mem_daemon", proc_mem_daemon},
    {"proc_cwd_daemon", proc_cwd_daemon},
    {"zygote_fds", zygote_fds},
    {"doublefork_state", doublefork_state},
    {"bpf", do_bpf},
    {"io_uring", do_io_uring},
    {"proc_self_root_state", proc_self_root_state},
    {"vault_chmod_symlink", vault_chmod_symlink},
};

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 2) {
        fprintf(stderr, "usage: escape NAME\n");
        return 2;
    }
    attempt = argv[1];
    if (!strcmp(attempt, "ptrace_victim"))
        do_ptrace("VICTIM");
    else if (!strcmp(attempt, "ptrace_daemon"))
        do_ptrace("DAEMON");
    else if (!strcmp(attempt, "vm_readv_daemon"))
        vm_rw("DAEMON", 0);
    else if (!strcmp(attempt, "vm_writev_victim"))
        vm_rw("VICTIM", 1);
    else {
        size_t i;
        for (i = 0; i < sizeof attempts / sizeof *attempts; i++)
            if (!strcmp(attempt, attempts[i].name) && attempts[i].fn) {
                attempts[i].fn();
                break;
            }
        if (i == sizeof attempts / sizeof *attempts) {
            printf("ERROR %s: unknown attempt\n", attempt);
            return 2;
        }
    }
    finish();
    return 0;
}
