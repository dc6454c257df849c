/*
 * jobchild.h: the steps that turn a new child into a job's program.
 *
 * Two programs start jobs: the worker itself (worker._spawn, _spawn.c) and
 * the keeper (jobgate-keeper, keeper.c), which stays the job's parent so that
 * the job outlives the worker. Both include this file, so that a job is set
 * up the same way whichever starts it. Everything here is static: each of
 * them gets its own copy, and nothing is linked between them.
 *
 * Both vfork(). The worker waits for the exec (launch()); the keeper's child
 * reports its start to the worker before it does any of this, and the
 * keeper learns of a failed step only once the job has ended. Either way the
 * child, before it executes the program:
 *
 *   1. every signal back to its default action, then no signal blocked
 *      (raw system calls: glibc's wrappers skip the signals it reserves);
 *   2. joins the job's cgroups (writes "0" to each open cgroup.procs: one
 *      on cgroup v2, one per controller hierarchy on cgroup v1);
 *   3. leads a new session;
 *   4. stdin, stdout and stderr from the given descriptors, every other
 *      descriptor closed on exec, except those asked to be passed on;
 *   5. changes to the working directory;
 *   6. drops every supplementary group, then sets real, effective and saved
 *      group and user ids to the job's (when asked to switch), and checks
 *      that no way back to root is left;
 *   7. executes the program.
 *
 * The ids are set with raw system calls: glibc's wrappers would signal the
 * parent's other threads to change theirs too, which a vfork()ed child must
 * never do. With every user id non-zero the kernel clears all capabilities.
 *
 * A step that fails writes the step and errno to a close-on-exec pipe
 * (plan.report_fd) and exits with 127. An empty pipe, once the child has
 * exited or executed, means the exec succeeded. launch() reads it at once;
 * the keeper once the job has ended, for its exit file.
 *
 * The includer defines _GNU_SOURCE (Python.h does) before any system header.
 */

#ifndef JOBGATE_JOBCHILD_H
#define JOBGATE_JOBCHILD_H

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

/* The unified hierarchy and the memory, cpu and pids hierarchies of v1. */
#define MAX_CGROUPS 8
/* Descriptors a child may keep open through its exec (the keeper's). */
#define MAX_PASS_FDS 16

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

/*
 * The numbers travel from the keeper to the worker (its report, its exit
 * file: keeper.c) and are turned into the same OSError as worker._spawn's
 * own: a new step goes at the end, so that a number never changes its
 * meaning.
 */
enum step {
    STEP_CGROUP = 1,
    STEP_SESSION,
    STEP_STREAMS,
    STEP_DESCRIPTORS,
    STEP_CWD,
    STEP_GROUPS,
    STEP_GID,
    STEP_UID,
    STEP_CHECK,
    STEP_EXEC,
    STEP_PASS,
    /* Not a step of the child: the keeper could not make the pipe for the
       job's output or could not fork. */
    STEP_START,
    STEP_COUNT,
};

/* Not every includer reports failures in words (the keeper sends numbers). */
static const char *step_text[STEP_COUNT] __attribute__((unused)) = {
    [STEP_CGROUP] = "joining the job's cgroup",
    [STEP_SESSION] = "starting a new session",
    [STEP_STREAMS] = "setting up stdin, stdout and stderr",
    [STEP_DESCRIPTORS] = "closing the worker's descriptors",
    [STEP_CWD] = "changing to the working directory",
    [STEP_GROUPS] = "dropping supplementary groups",
    [STEP_GID] = "switching to the job's group",
    [STEP_UID] = "switching to the job's user",
    [STEP_CHECK] = "checking the job's ids",
    [STEP_EXEC] = "executing",
    [STEP_PASS] = "keeping the descriptors passed on",
    [STEP_START] = "starting the job's process",
};

struct failure {
    int step;
    int err;
};

struct plan {
    const char *path;
    char *const *argv;
    char *const *envp;
    const char *cwd;
    int stdin_fd;
    int stdout_fd;
    int stderr_fd;
    int cgroup_fds[MAX_CGROUPS];
    int n_cgroups;
    int pass_fds[MAX_PASS_FDS];
    int n_pass;
    long uid; /* -1: keep the parent's */
    long gid;
    int report_fd; /* where a failed step is written: set by launch(), or
                      by the keeper */
};

static int
close_range_cloexec(unsigned int first)
{
    return (int)syscall(SYS_close_range, first, ~0U, CLOSE_RANGE_CLOEXEC);
}

static int
keep_on_exec(int fd)
{
    int flags = fcntl(fd, F_GETFD);
    return flags < 0 ? -1 : fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC);
}

/* The descriptor as ``target``, not closed on exec. */
static int
place(int fd, int target)
{
    if (fd == target)
        return keep_on_exec(fd);
    return dup2(fd, target) < 0 ? -1 : 0;
}

/* Runs in the new child (vfork()ed: it shares its parent's memory): only
   async-signal-safe calls, no allocation. */
static void __attribute__((noreturn))
child(const struct plan *p)
{
    struct failure f = {0, 0};
    /* The kernel's struct sigaction: glibc's wrapper refuses the signals it
       keeps for itself (32 and 33), which may be ignored too. */
    struct {
        void (*handler)(int);
        unsigned long flags;
        void (*restorer)(void);
        unsigned long mask;
    } dfl;
    unsigned long none = 0;
    int sig, i;

    memset(&dfl, 0, sizeof dfl);
    dfl.handler = SIG_DFL;
    for (sig = 1; sig <= 64; sig++) {
        if (sig != SIGKILL && sig != SIGSTOP)
            (void)syscall(SYS_rt_sigaction, sig, &dfl, NULL, sizeof dfl.mask);
    }
    (void)syscall(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, sizeof none);

    for (i = 0; i < p->n_cgroups; i++) {
        if (write(p->cgroup_fds[i], "0", 1) != 1) {
            f.step = STEP_CGROUP;
            goto fail;
        }
    }
    if (setsid() < 0) {
        f.step = STEP_SESSION;
        goto fail;
    }
    if (place(p->stdin_fd, 0) < 0 || place(p->stdout_fd, 1) < 0 ||
        place(p->stderr_fd, 2) < 0) {
        f.step = STEP_STREAMS;
        goto fail;
    }
    if (close_range_cloexec(3) < 0) {
        f.step = STEP_DESCRIPTORS;
        goto fail;
    }
    /* Closed on exec like all the others a moment ago: only now can these
       be picked out, whatever their flags were in the parent. */
    for (i = 0; i < p->n_pass; i++) {
        if (keep_on_exec(p->pass_fds[i]) < 0) {
            f.step = STEP_PASS;
            goto fail;
        }
    }
    if (p->cwd != NULL && chdir(p->cwd) < 0) {
        f.step = STEP_CWD;
        goto fail;
    }
    if (p->uid >= 0) {
        uid_t r, e, s;
        gid_t gr, ge, gs;

        if (syscall(SYS_setgroups, 0, NULL) < 0) {
            f.step = STEP_GROUPS;
            goto fail;
        }
        if (syscall(SYS_setresgid, (gid_t)p->gid, (gid_t)p->gid, (gid_t)p->gid) < 0) {
            f.step = STEP_GID;
            goto fail;
        }
        if (syscall(SYS_setresuid, (uid_t)p->uid, (uid_t)p->uid, (uid_t)p->uid) < 0) {
            f.step = STEP_UID;
            goto fail;
        }
        /* Nothing may be left that leads back: not an id, not a group. */
        if (syscall(SYS_getresuid, &r, &e, &s) < 0 || syscall(SYS_getresgid, &gr, &ge, &gs) < 0 ||
            r != (uid_t)p->uid || e != r || s != r || gr != (gid_t)p->gid || ge != gr ||
            gs != gr || syscall(SYS_getgroups, 0, NULL) != 0 ||
            syscall(SYS_setresuid, 0, 0, 0) == 0) {
            f.step = STEP_CHECK;
            errno = EPERM;
            goto fail;
        }
    }
    execve(p->path, p->argv, p->envp);
    f.step = STEP_EXEC;
fail:
    f.err = errno;
    (void)!write(p->report_fd, &f, sizeof f);
    _exit(127);
}

/* vfork() in a frame of its own: the caller's locals are safe from it. */
static pid_t __attribute__((noinline))
start_child(const struct plan *p, int *err)
{
    sigset_t all, old;
    pid_t pid;

    /* No signal may reach the child while it still shares our memory and
       our handlers; it unblocks them once they are all back to default. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pid = vfork();
    if (pid == 0)
        child(p);
    *err = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return pid;
}

/*
 * Starts the child described by ``p`` and learns how it went. Returns the
 * child's pid once it has executed the program. Otherwise -1, with ``*f``
 * telling why: step 0 when no child could be started at all (the report
 * pipe or vfork() failed: errno in f->err), else the step the child failed
 * at (the child has been reaped). The worker's way (_spawn.c); the keeper
 * does not wait for the exec, and starts its child on its own.
 */
static pid_t __attribute__((unused))
launch(struct plan *p, struct failure *f)
{
    int fds[2];
    int err = 0;
    pid_t pid;
    ssize_t got;

    f->step = 0;
    f->err = 0;
    if (pipe2(fds, O_CLOEXEC) < 0) {
        f->err = errno;
        return -1;
    }
    p->report_fd = fds[1];
    pid = start_child(p, &err);
    close(fds[1]);
    if (pid < 0) {
        close(fds[0]);
        f->err = err;
        return -1;
    }
    do {
        got = read(fds[0], f, sizeof *f);
    } while (got < 0 && errno == EINTR);
    err = got < 0 ? errno : EIO;
    close(fds[0]);
    if (got == 0)
        return pid;
    /* The child failed before or in exec (or the report is torn): it has
       exited or is about to; reap it. */
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
        ;
    if (got != (ssize_t)sizeof *f || f->step <= 0 || f->step >= STEP_COUNT) {
        f->step = STEP_EXEC;
        f->err = err;
    }
    return -1;
}

#endif /* JOBGATE_JOBCHILD_H */
