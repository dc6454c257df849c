/*
 * jobgate-keeper: the parent of one job, so that the job outlives the worker.
 *
 * A job started by the worker itself is the worker's child: its output goes
 * into a pipe the worker reads, and only the worker can learn how it ended.
 * A restart of the worker would lose both. The worker starts this program
 * instead (as root, in no cgroup of the job's), and it starts the job:
 *
 *   jobgate-keeper --report FD (--output FD | --output-name NAME) --dir FD
 *                  --head BYTES --tail BYTES --drain-ms MS
 *                  [--cgroup-procs FD]... [--cgroup-kill FD] [--channel FD]
 *                  [--uid UID --gid GID] --cwd DIR -- PATH ARGV0 [ARG...]
 *
 * or, forked by a keeper the worker started once to serve it (see serve()
 * below), with the same arguments sent over a socket; there --dir-name NAME
 * may stand for --dir: the job's directory NAME in the server's --jobs-dir,
 * which the keeper makes when it first needs it (job_dir()).
 *
 * The descriptors are open already, passed on by the worker. With
 * --output-name the output file is NAME in --dir, made (0640) when the job
 * writes its first byte: a job that writes nothing costs no file. The keeper's
 * environment is the job's; its stdin (/dev/null) is the job's stdin; its
 * stderr carries its own complaints, a line each. It may hold other
 * descriptors the worker passed on (a lock, say): it never touches them, so
 * they stay open as long as it runs, and the job does not inherit them.
 *
 *   1. It ignores the signals that could end it by accident: it leads a
 *      session of its own and is in none of the job's cgroups, so that only
 *      a SIGKILL sent to it by name ends it.
 *   2. It vfork()s the job's process, which is set up as worker._spawn sets
 *      up its children (jobchild.h): it joins the job's cgroups, leads a new
 *      session, has its stdout and stderr on a pipe to the keeper and drops
 *      to the job's ids before it executes the program.
 *   3. The worker is told on --report, first thing in the new process: one
 *      record { int32 step, int32 value, int64 start }, step 0 and the
 *      job's pid, then the keeper's own start time in clock ticks since
 *      boot (what, with its pid, names the keeper after a restart). The
 *      worker does not wait for the job's exec: a step of the child that
 *      fails (the exec included) goes to the keeper alone, through a pipe of
 *      its own, and ends up in the exit file (start_error). Only a keeper
 *      that could not start the job's process at all (no pipe, no vfork)
 *      reports a failure, the step and errno, and exits there (127).
 *   4. It copies the job's output into --output at the offset where the
 *      job wrote it, and keeps the file small: the first --head bytes stay,
 *      of the rest only the newest --tail bytes; the bytes in between are
 *      deallocated (a hole), so that the file's size is still all the job
 *      wrote. A write that fails (a full disk) stops the copying, never the
 *      reading: the job must not block, nor get SIGPIPE, because of it.
 *   5. Once the job's main process has exited, it ends whatever the job
 *      left behind (its cgroup through --cgroup-kill, its process group) and
 *      reads what is left in the pipe, for at most --drain-ms. Only then does
 *      it reap the main process, right before it writes the exit file and
 *      exits: until then the job's pid, and so its process group's id,
 *      belongs to no other process, and the worker may signal the group by
 *      that id.
 *   6. It writes how it ended into "exit" in --dir, atomically:
 *
 *        status <the wait status>
 *        output_bytes <all the job wrote>
 *        output_error <errno> <bytes in the file when a write failed>
 *        drain_cut 1            (when the pipe had not ended by --drain-ms)
 *        start_error <step> <errno>  (the program never ran: jobchild.h's
 *                                     step, and status is 127's)
 *
 *      With --channel (a SOCK_SEQPACKET socket the worker holds the other
 *      end of), the same text goes to the worker as one message instead,
 *      and the keeper waits for one byte back: the worker has recorded the
 *      end, and no exit file is written. A worker that closes its end
 *      first (it stops, or could not record the end) or is gone gets the
 *      exit file after all (tell_worker()).
 *
 * Exit status: 0 once the end is told (the exit file written, or the worker
 * answered); 127 if the job's process could not be started; 2 for bad
 * arguments; 1 if the exit file could not be written.
 */

#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "jobchild.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/socket.h>

/* One read of the job's output. */
#define CHUNK (64 * 1024)
/* The middle of the output is freed once this much of it has piled up: one
   system call per MiB, and the file never holds more than this beyond its
   head and tail. */
#define PUNCH_SLACK (1024LL * 1024)
/* Without a pidfd (older kernels) the keeper looks for the job's exit this
   often. */
#define EXIT_POLL_MS 50
/* Sizes and offsets are kept far from overflowing a 64-bit offset. */
#define MAX_BYTES (1LL << 60)

extern char **environ;

/* What the worker reads on --report: native byte order, like the worker. */
struct report {
    int32_t step;
    int32_t value;
    int64_t start; /* the keeper's own start time (/proc/self/stat), 0 if unknown */
};

/* Serving (see serve() below): the directory jobs' directories are made in. */
static int jobs_fd = -1;
/* A spare's own start time (own_start_time()), read while it waits; 0 if not
   read yet. */
static int64_t own_start;

struct output {
    int fd;            /* -1 until the named file is made */
    int dir;           /* where a named file is made; -1 until made if named */
    const char *dir_name; /* --dir-name: dir's name in jobs_fd, made when needed */
    const char *name;  /* the file's name in dir, or NULL: fd is given */
    long long head, tail;
    long long total;   /* everything the job wrote so far */
    long long punched; /* [head, punched) is freed */
    int punch_failed;
    int write_err; /* the first failed write's errno, 0 if none */
    long long kept; /* the bytes in the file when it failed */
};

static char chunk[CHUNK];

static void __attribute__((format(printf, 1, 2)))
say(const char *fmt, ...)
{
    char line[512];
    int n = snprintf(line, sizeof line, "jobgate-keeper: ");
    va_list ap;

    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof line - 2)
        n = (int)sizeof line - 2;
    line[n++] = '\n';
    /* One write, so that lines of several keepers sharing the worker's
       stderr do not mix. */
    (void)!write(2, line, (size_t)n);
}

static void __attribute__((noreturn))
usage(const char *why, const char *what)
{
    say("%s%s%s", why, what ? ": " : "", what ? what : "");
    say("usage: jobgate-keeper --report FD (--output FD | --output-name NAME) "
        "(--dir FD | --dir-name NAME) --head BYTES --tail BYTES --drain-ms MS "
        "[--cgroup-procs FD]... "
        "[--cgroup-kill FD] [--uid UID --gid GID] --cwd DIR -- PATH ARGV0 [ARG...]");
    exit(2);
}

/* A decimal number in [0, max], or the usage message. */
static long long
number(const char *option, const char *text, long long max)
{
    char *end;
    long long n;

    if (text == NULL)
        usage("a value is missing", option);
    /* Digits only: strtoll() would also take a sign and leading blanks. */
    if (text[0] < '0' || text[0] > '9')
        usage("not a number", option);
    errno = 0;
    n = strtoll(text, &end, 10);
    if (errno != 0 || *end != '\0' || n > max)
        usage("not a number in range", option);
    return n;
}

/* An open descriptor above stderr, or the usage message. */
static int
descriptor(const char *option, const char *text)
{
    int fd = (int)number(option, text, INT_MAX);

    if (fd < 3 || fcntl(fd, F_GETFD) < 0)
        usage("not an open descriptor above 2", option);
    return fd;
}

static long long
now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * Frees [punched, total - tail) once ``slack`` bytes of it have piled up.
 * The size stays (FALLOC_FL_KEEP_SIZE): offsets in the file remain offsets
 * in all the job wrote, and the hole reads as zeros.
 */
static void
trim(struct output *o, long long slack)
{
    long long end;

    if (o->punch_failed || o->write_err || o->total <= o->head + o->tail)
        return;
    end = o->total - o->tail;
    if (end - o->punched < slack)
        return;
    if (fallocate(o->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, o->punched,
                  end - o->punched) < 0) {
        /* The output is still right, only bigger on disk than it should be;
           trying again every MiB would not help. */
        o->punch_failed = 1;
        say("cannot free the middle of the job's output, the file keeps it all: %s",
            strerror(errno));
        return;
    }
    o->punched = end;
}

/*
 * The job's directory, open: the one given (--dir), or else the one named
 * by --dir-name in the jobs' directory, made (0750) the first time it is
 * needed: for the job's first byte of output, or for an exit file no worker
 * took from the channel. A job that writes nothing and whose end the worker
 * hears costs no directory at all. -1 with errno set if it cannot be had.
 */
static int
job_dir(struct output *o)
{
    if (o->dir < 0 && o->dir_name != NULL) {
        if (mkdirat(jobs_fd, o->dir_name, 0750) < 0 && errno != EEXIST)
            return -1;
        o->dir = openat(jobs_fd, o->dir_name, O_PATH | O_DIRECTORY | O_CLOEXEC);
    }
    return o->dir;
}

/* ``n`` more bytes of the job's output, written where they belong. */
static void
take(struct output *o, const char *data, size_t n)
{
    size_t done = 0;

    if (o->fd < 0 && !o->write_err) {
        /* The first output of a job given a name: making the file is a
           write like any other, and fails as one (a full disk). */
        int dir = job_dir(o);

        o->fd = dir < 0 ? -1 : openat(dir, o->name, O_WRONLY | O_CREAT | O_CLOEXEC, 0640);
        if (o->fd < 0) {
            o->write_err = errno;
            o->kept = 0;
            say("cannot make the job's output file, dropping it: %s", strerror(errno));
        }
    }
    while (!o->write_err && done < n) {
        ssize_t w = pwrite(o->fd, data + done, n - done, (off_t)(o->total + (long long)done));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            /* A full disk or a file too big: what is in the file stays, and
               the rest is counted but dropped. Say so only once. */
            o->write_err = w < 0 ? errno : EIO;
            o->kept = o->total + (long long)done;
            say("cannot write the job's output, dropping the rest: %s", strerror(o->write_err));
            break;
        }
        done += (size_t)w;
    }
    o->total += (long long)n;
    trim(o, PUNCH_SLACK);
}

/*
 * Reads what the pipe has. Returns 0 once it has ended (every writer gone),
 * 1 otherwise.
 */
static int
drain_once(int fd, struct output *o)
{
    ssize_t n = read(fd, chunk, sizeof chunk);

    if (n > 0) {
        take(o, chunk, (size_t)n);
        return 1;
    }
    if (n < 0 && (errno == EINTR || errno == EAGAIN))
        return 1;
    if (n < 0)
        say("cannot read the job's output: %s", strerror(errno));
    return 0;
}

/*
 * The job's main process has exited. It is a zombie, and stays one until the
 * keeper is done (reap()): its pid still names its process group. What it
 * left running is ended: its cgroup at once, then its process group (those
 * that left the group but not the session would hold the pipe on; the
 * cgroup catches them).
 */
static void
end_job(pid_t pid, int kill_fd)
{
    if (kill_fd >= 0)
        (void)!write(kill_fd, "1", 1);
    if (kill(-pid, SIGKILL) < 0 && errno != ESRCH)
        say("cannot end the job's process group %d: %s", (int)pid, strerror(errno));
}

/* The job's main process, reaped at last. Returns its wait status. */
static int
reap(pid_t pid)
{
    int status = 0;

    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) {
            say("cannot reap the job's process %d: %s", (int)pid, strerror(errno));
            break;
        }
    }
    return status;
}

/*
 * vfork() with every signal blocked, in a frame of its own (the caller's
 * locals are safe from the child, which runs on this stack until it
 * executes). No page of the keeper is copied for the job, nor torn down at
 * its exec: on the bench host fork() cost the keeper 0.1-0.2 ms of CPU per
 * start in page-table copies and copy-on-write faults.
 *
 * The child reports the start itself, first of all: the keeper stays
 * suspended until the child has executed, and the worker need not wait for
 * the child's cgroups or exec (a step that fails goes to the start pipe, as
 * ever). The report is { 0, the child's pid, ``start`` }.
 *
 * The child starts with the keeper's dispositions (SIGTERM ignored...)
 * until it has put them back to default, and a signal that is blocked is
 * never ignored, only kept pending. A SIGTERM the worker sends to the job's
 * pid as soon as it has it is thus delivered once the child unblocks, not
 * lost. Returns the child's pid, or -1 with errno in ``*err``.
 */
static pid_t __attribute__((noinline))
start_job(const struct plan *p, int report_fd, int64_t start, int *err)
{
    sigset_t all, old;
    pid_t pid;

    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &old);
    pid = vfork();
    if (pid == 0) {
        struct report r = {0, (int32_t)syscall(SYS_getpid), start};

        if (write(report_fd, &r, sizeof r) < 0 && errno == EPIPE) {
            /* The worker is gone. The SIGPIPE this raised is pending (it
               is blocked, so not ignored): taken here, it never reaches
               the job once its signals are back to default. */
            sigset_t pipe_only;
            struct timespec now = {0, 0};

            sigemptyset(&pipe_only);
            sigaddset(&pipe_only, SIGPIPE);
            (void)syscall(SYS_rt_sigtimedwait, &pipe_only, NULL, &now, sizeof(unsigned long));
        }
        child(p); /* unblocks every signal; never returns */
    }
    *err = errno;
    sigprocmask(SIG_SETMASK, &old, NULL);
    return pid;
}

/*
 * The step the job's process failed at, if it did: it wrote { step, errno }
 * into the start pipe (non-blocking) before it exited; an exec that
 * succeeded closed the pipe's last write end. Called once the main process
 * has exited, so that the pipe holds all it will ever hold. Returns 1 and
 * fills ``f`` if a step failed.
 */
static int
start_failed(int fd, struct failure *f)
{
    ssize_t got;

    do {
        got = read(fd, f, sizeof *f);
    } while (got < 0 && errno == EINTR);
    if (got == (ssize_t)sizeof *f && f->step > 0 && f->step < STEP_COUNT)
        return 1;
    if (got > 0)
        say("the job's process left a report that makes no sense (%zd bytes)", got);
    return 0;
}

/* Whether the job's main process has exited, for a keeper without pidfd. */
static int
exited(pid_t pid)
{
    siginfo_t info;

    memset(&info, 0, sizeof info);
    return waitid(P_PID, (id_t)pid, &info, WEXITED | WNOHANG | WNOWAIT) == 0 &&
           info.si_pid == pid;
}

/* This process's start time, in clock ticks since boot (field 22 of
   /proc/self/stat): with its pid, what names it for good, which the worker
   records to find it again after a restart. 0 if it cannot be read. */
static int64_t
own_start_time(void)
{
    char buf[1024], *at;
    ssize_t n;
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC), field;

    if (fd < 0)
        return 0;
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    /* The command name (field 2) may hold spaces and parentheses: the
       fields after it start after its last ')'. */
    at = strrchr(buf, ')');
    for (field = 2; at != NULL && field < 22; field++)
        at = strchr(at + 1, ' ');
    return at != NULL ? (int64_t)strtoll(at + 1, NULL, 10) : 0;
}

/* "exit" in ``dir``: written to exit.tmp, then renamed, so that a reader sees
   all of it or nothing. Where the worker made the job's directory (--dir),
   it made exit.tmp in it with a block allocated, so that the end of a job
   is recorded even once the disk is full (the job's output may have filled
   it): it is written in place, not truncated first, then cut to its length.
   A directory the keeper makes has no such room: its exit file is only for
   a worker that did not take the end from the channel. */
static int
write_exit(int dir, const char *text, size_t len)
{
    int fd = openat(dir, "exit.tmp", O_WRONLY | O_CREAT | O_CLOEXEC, 0640);
    ssize_t w;

    if (fd < 0) {
        say("cannot create exit.tmp: %s", strerror(errno));
        return -1;
    }
    do {
        w = pwrite(fd, text, len, 0);
    } while (w < 0 && errno == EINTR);
    if (w == (ssize_t)len && ftruncate(fd, (off_t)len) < 0)
        w = -1;
    if (w != (ssize_t)len) {
        say("cannot write exit.tmp: %s", w < 0 ? strerror(errno) : "short write");
        close(fd);
        (void)unlinkat(dir, "exit.tmp", 0);
        return -1;
    }
    if (close(fd) < 0 || renameat(dir, "exit.tmp", dir, "exit") < 0) {
        say("cannot put the exit file in place: %s", strerror(errno));
        (void)unlinkat(dir, "exit.tmp", 0);
        return -1;
    }
    return 0;
}

/*
 * The exit record (what the exit file would hold) sent to the worker on
 * --channel, a SOCK_SEQPACKET socket: 1 once the worker has answered that
 * it recorded the job's end (one byte), so that no exit file is needed. 0
 * if the worker is gone, or goes before it answers (a restart): then the
 * exit file is written, for its next run to find.
 */
static int
tell_worker(int channel, const char *text, size_t len)
{
    char ack;
    ssize_t n;

    if (send(channel, text, len, MSG_NOSIGNAL) != (ssize_t)len)
        return 0;
    do {
        n = recv(channel, &ack, 1, 0);
    } while (n < 0 && errno == EINTR);
    close(channel);
    return n == 1;
}

/* What a served keeper tells the serving keeper on ``took`` (serve()): one
   message each, written whole (writes this small to a pipe never mix). */
struct news {
    char what;   /* NEWS_TOOK, NEWS_BACK or NEWS_LEFT */
    int32_t pid; /* the keeper's */
};
#define NEWS_TOOK 't' /* it took a request */
#define NEWS_BACK 'b' /* its job is over and told: it waits for another */
#define NEWS_LEFT 'x' /* it waited for another in vain, and exits */

static int took_fd = -1;
/* Whether NEWS_TOOK was sent for the request in hand. */
static int took_told;
/* Whether the job's end went to the worker, who answered (tell_worker()). */
static int told_worker;

static void
tell_server(char what)
{
    struct news n;

    memset(&n, 0, sizeof n);
    n.what = what;
    n.pid = (int32_t)getpid();
    if (took_fd >= 0)
        (void)!write(took_fd, &n, sizeof n);
}

/* Told once the job's start is reported, so that the server's fork of the
   next spare does not compete with the start for a CPU; or at exit. */
static void
tell_took(void)
{
    if (!took_told) {
        took_told = 1;
        tell_server(NEWS_TOOK);
    }
}

static const int ignored[] = {SIGHUP, SIGINT, SIGTERM, SIGQUIT, SIGPIPE, SIGUSR1, SIGUSR2};

/* Keeps one job: ``argv`` as described at the top, ``envp`` the job's
   environment. Returns the keeper's exit status. */
static int
keep(int argc, char **argv, char **envp)
{
    struct plan p;
    struct output o;
    struct failure f;
    struct sigaction ign;
    int64_t start;
    int report_fd = -1, dir_fd = -1, kill_fd = -1, channel = -1, has_head = 0, has_tail = 0;
    const char *dir_name = NULL;
    long long drain_ms = -1;
    int pipe_fds[2], start_fds[2], pidfd, pipe_open, job_done = 0, drain_cut = 0, status;
    int poll_failed = 0;
    long long exit_ms = 0;
    pid_t pid;
    char text[256];
    int len, i;
    size_t k;

    memset(&p, 0, sizeof p);
    memset(&o, 0, sizeof o);
    p.uid = p.gid = -1;
    o.fd = -1;
    for (i = 1; i < argc; i++) {
        const char *opt = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;

        if (strcmp(opt, "--") == 0) {
            i++;
            break;
        }
        if (strcmp(opt, "--report") == 0) {
            report_fd = descriptor(opt, val);
        } else if (strcmp(opt, "--output") == 0) {
            o.fd = descriptor(opt, val);
        } else if (strcmp(opt, "--output-name") == 0) {
            /* A name in --dir, never a path: the file is made there. */
            if (val == NULL || val[0] == '\0' || strchr(val, '/') != NULL ||
                strcmp(val, ".") == 0 || strcmp(val, "..") == 0)
                usage("not a file name", opt);
            o.name = val;
        } else if (strcmp(opt, "--dir") == 0) {
            dir_fd = descriptor(opt, val);
        } else if (strcmp(opt, "--dir-name") == 0) {
            /* Served only: made, when needed, in the jobs' directory the
               server was given. */
            if (jobs_fd < 0)
                usage("--dir-name needs a server started with --jobs-dir", NULL);
            if (val == NULL || val[0] == '\0' || val[0] == '.' || strchr(val, '/') != NULL)
                usage("not a job directory's name", opt);
            dir_name = val;
        } else if (strcmp(opt, "--head") == 0) {
            o.head = number(opt, val, MAX_BYTES);
            has_head = 1;
        } else if (strcmp(opt, "--tail") == 0) {
            o.tail = number(opt, val, MAX_BYTES);
            has_tail = 1;
        } else if (strcmp(opt, "--drain-ms") == 0) {
            drain_ms = number(opt, val, 24LL * 3600 * 1000);
        } else if (strcmp(opt, "--cgroup-procs") == 0) {
            if (p.n_cgroups == MAX_CGROUPS)
                usage("too many cgroups", opt);
            p.cgroup_fds[p.n_cgroups++] = descriptor(opt, val);
        } else if (strcmp(opt, "--cgroup-kill") == 0) {
            kill_fd = descriptor(opt, val);
        } else if (strcmp(opt, "--channel") == 0) {
            channel = descriptor(opt, val);
        } else if (strcmp(opt, "--uid") == 0) {
            p.uid = (long)number(opt, val, UINT_MAX - 1);
        } else if (strcmp(opt, "--gid") == 0) {
            p.gid = (long)number(opt, val, UINT_MAX - 1);
        } else if (strcmp(opt, "--cwd") == 0) {
            if (val == NULL || val[0] == '\0')
                usage("a value is missing", opt);
            p.cwd = val;
        } else {
            usage("unknown option", opt);
        }
        i++; /* every option has a value */
    }
    if (report_fd < 0 || (o.fd < 0 && o.name == NULL) ||
        (dir_fd < 0) == (dir_name == NULL) || !has_head || !has_tail || drain_ms < 0 ||
        p.cwd == NULL)
        usage("--report, --output (or --output-name), --dir (or --dir-name), --head, "
              "--tail, --drain-ms and --cwd are needed",
              NULL);
    if (o.fd >= 0 && o.name != NULL)
        usage("--output and --output-name exclude each other", NULL);
    if ((p.uid < 0) != (p.gid < 0))
        usage("--uid and --gid go together", NULL);
    if (argc - i < 2)
        usage("the program's path and argv[0] are needed after --", NULL);
    p.path = argv[i];
    start = own_start ? own_start : own_start_time();
    p.argv = argv + i + 1;
    p.envp = envp;
    o.punched = o.head;

    memset(&ign, 0, sizeof ign);
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    for (k = 0; k < sizeof ignored / sizeof ignored[0]; k++)
        sigaction(ignored[k], &ign, NULL);

    /* The job's stdout and stderr, and where its process says which step
       failed (never more than a record: no write to it ever blocks). Both
       close-on-exec, so that only the job's copies of the first (placed on
       1 and 2) survive its exec. */
    pid = -1;
    f.step = STEP_START;
    f.err = 0;
    if (pipe2(pipe_fds, O_CLOEXEC) < 0) {
        f.err = errno;
    } else if (pipe2(start_fds, O_CLOEXEC | O_NONBLOCK) < 0) {
        f.err = errno;
        close(pipe_fds[0]);
        close(pipe_fds[1]);
    } else {
        p.stdin_fd = 0;
        p.stdout_fd = p.stderr_fd = pipe_fds[1];
        p.report_fd = start_fds[1];
        o.dir = dir_fd;
        o.dir_name = dir_name;
        pid = start_job(&p, report_fd, start, &f.err);
    }
    /* The job's process reported its start itself (start_job()). The worker
       may be gone already (SIGPIPE is ignored): the job runs on all the
       same, and the exit file will tell. */
    if (pid < 0) {
        struct report r = {f.step, f.err, start};

        if (write(report_fd, &r, sizeof r) != (ssize_t)sizeof r)
            say("cannot report the start to the worker: %s", strerror(errno));
    }
    close(report_fd);
    tell_took();
    if (pid < 0)
        return 127;

    /* The job's process has its own copies: the keeper's write ends would
       keep the pipes from ever ending. */
    for (i = 0; i < p.n_cgroups; i++)
        close(p.cgroup_fds[i]);
    close(pipe_fds[1]);
    close(start_fds[1]);
    pipe_open = 1;
    pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0)
        say("no pidfd for the job (%s): looking for its exit every %d ms", strerror(errno),
            EXIT_POLL_MS);

    while (pipe_open || !job_done) {
        struct pollfd fds[2];
        int nfds = 0, timeout = -1, pipe_at = -1, pid_at = -1, n;

        if (pipe_open) {
            fds[nfds] = (struct pollfd){.fd = pipe_fds[0], .events = POLLIN};
            pipe_at = nfds++;
        }
        if (!job_done && pidfd >= 0) {
            fds[nfds] = (struct pollfd){.fd = pidfd, .events = POLLIN};
            pid_at = nfds++;
        }
        if (job_done) {
            /* Something outside the job's process group and cgroup (or a
               job without a cgroup whose child left its session) may hold
               the pipe open forever: the drain has a deadline. */
            long long left = exit_ms + drain_ms - now_ms();
            if (left <= 0) {
                drain_cut = 1;
                break;
            }
            timeout = (int)left;
        } else if (pidfd < 0) {
            timeout = EXIT_POLL_MS;
        }
        n = poll(fds, (nfds_t)nfds, timeout);
        if (n < 0) {
            /* Only a shortage of memory could bring this about, for a
               while: the job must be kept all the same, so try again. */
            if (errno != EINTR) {
                if (!poll_failed++)
                    say("poll: %s", strerror(errno));
                usleep(10 * 1000);
            }
            continue;
        }
        if (pipe_at >= 0 && fds[pipe_at].revents != 0 && !drain_once(pipe_fds[0], &o)) {
            close(pipe_fds[0]);
            pipe_open = 0;
        }
        if (!job_done && ((pid_at >= 0 && fds[pid_at].revents != 0) ||
                          (pidfd < 0 && exited(pid)))) {
            siginfo_t info;

            /* Exited, not reaped (WNOWAIT): it stays a zombie, its pid the
               name of its process group, until the drain is over. */
            while (waitid(P_PID, (id_t)pid, &info, WEXITED | WNOWAIT) < 0 && errno == EINTR)
                ;
            end_job(pid, kill_fd);
            job_done = 1;
            exit_ms = now_ms();
            /* A zombie's pidfd stays readable: polling it again would
               spin. */
            if (pidfd >= 0) {
                close(pidfd);
                pidfd = -1;
            }
        }
    }
    if (pipe_open)
        close(pipe_fds[0]);
    if (kill_fd >= 0)
        close(kill_fd);
    /* The output is complete: nothing between the head and the tail is
       left on disk, however little of it there is. */
    trim(&o, 1);
    /* Done with the job's process group: its name may go now. */
    status = reap(pid);

    len = snprintf(text, sizeof text, "status %d\noutput_bytes %lld\n", status, o.total);
    if (o.write_err)
        len += snprintf(text + len, sizeof text - (size_t)len, "output_error %d %lld\n",
                        o.write_err, o.kept);
    if (drain_cut)
        len += snprintf(text + len, sizeof text - (size_t)len, "drain_cut 1\n");
    if (start_failed(start_fds[0], &f))
        len += snprintf(text + len, sizeof text - (size_t)len, "start_error %d %d\n", f.step,
                        f.err);
    close(start_fds[0]);
    if (channel >= 0 && tell_worker(channel, text, (size_t)len)) {
        told_worker = 1;
        return 0;
    }
    if (job_dir(&o) < 0) {
        say("cannot make the job's directory for its exit file: %s", strerror(errno));
        return 1;
    }
    return write_exit(o.dir, text, (size_t)len) < 0 ? 1 : 0;
}

/*
 * Serving: ``jobgate-keeper --serve FD [--jobs-dir DIRFD] [--idle-ms MS]``,
 * FD a connected
 * SOCK_SEQPACKET socket to the worker. The worker starts one such keeper
 * when it starts, and asks it for each job's keeper instead of executing
 * this program once per job: a fork() of this small process costs a start
 * less than an exec and the dynamic linking that follows it (what it buys
 * is in worker/kept.py, KeeperServer).
 *
 * The serving keeper forks each job's keeper ahead, as a spare (spare()
 * below): the spare leads a session of its own and waits on the socket. A
 * request is one message: decimal argc, then argc arguments as the keeper
 * takes them (without the program's name), then the job's environment,
 * each string ended by a NUL; its descriptors come with it (SCM_RIGHTS),
 * and an option that takes a descriptor names it "@I", the I-th of them.
 * "--dir-name NAME" instead of "--dir" names the job's directory in DIRFD
 * (the jobs' directory), made once the job writes or its exit file is due.
 * The spare that reads a request answers at once: one message, { int32 pid
 * } of itself with a pidfd of itself (SCM_RIGHTS), or { -errno } alone if
 * it cannot be watched. It then keeps the job as a keeper started by the
 * worker would, whatever becomes of the worker or of the serving keeper,
 * and the serving keeper forks the next spare once the job's start is
 * reported, unless a keeper back from its job waits already (spare()). The
 * serving keeper reaps its children as they end, and exits
 * once the worker's end of the socket is closed (the worker exited, or was
 * killed): the spare waiting then exits.
 */

#define SERVE_MAX_MESSAGE (256 * 1024)
#define SERVE_MAX_FDS (MAX_CGROUPS + MAX_PASS_FDS + 8)
#define SERVE_MAX_ARGS 4096

static char request[SERVE_MAX_MESSAGE + 1];

/* Where the serving keeper's own arguments and environment are: a keeper
   it forks writes its job's there (retitle()), so that /proc/PID/cmdline
   and /proc/PID/environ show what an executed keeper's show. */
static char *argv_room, *env_room;
static size_t argv_room_size, env_room_size;

/* The strings' span, from the first one's start to the last one's end. */
static size_t
span(char *const *strings)
{
    size_t n = 0;

    while (strings[n + 1] != NULL)
        n++;
    return (size_t)(strings[n] + strlen(strings[n]) + 1 - strings[0]);
}

/* ``strings`` into ``room``, each with its NUL, as many as fit whole; the
   rest of ``room`` zeroed. Returns whether all of them fit. */
static int
retitle(char *room, size_t size, char *const *strings)
{
    size_t used = 0;
    int all = 1;

    if (room == NULL)
        return 0;
    for (; *strings != NULL; strings++) {
        size_t len = strlen(*strings) + 1;

        if (len > size - used) {
            all = 0;
            break;
        }
        memcpy(room + used, *strings, len);
        used += len;
    }
    memset(room + used, 0, size - used);
    return all;
}

/* Whether ``opt`` takes a descriptor (keep()'s options). */
static int
takes_fd(const char *opt)
{
    static const char *const options[] = {"--report",       "--output",      "--dir",
                                           "--cgroup-procs", "--cgroup-kill", "--channel"};
    size_t k;

    for (k = 0; k < sizeof options / sizeof options[0]; k++)
        if (strcmp(opt, options[k]) == 0)
            return 1;
    return 0;
}

/* In a spare: the request's arguments, their "@I" made the descriptors'
   numbers, then keep(). Returns what keep() returns. */
static int
serve_one(char *msg, size_t len, const int *fds, int nfds)
{
    static char *args[SERVE_MAX_ARGS + 2];
    static char *env[SERVE_MAX_ARGS + 1];
    static char numbers[SERVE_MAX_FDS][16];
    char *at = msg, *end = msg + len, *stop;
    long argc, i, n_env = 0;
    int options = 1;

    stop = memchr(at, '\0', (size_t)(end - at));
    if (stop == NULL)
        usage("a request without its count", NULL);
    argc = strtol(at, NULL, 10);
    if (argc < 1 || argc > SERVE_MAX_ARGS)
        usage("a request with a bad count", NULL);
    at = stop + 1;
    args[0] = "jobgate-keeper";
    for (i = 1; i <= argc; i++) {
        stop = at < end ? memchr(at, '\0', (size_t)(end - at)) : NULL;
        if (stop == NULL)
            usage("a request cut short", NULL);
        args[i] = at;
        if (options && strcmp(at, "--") == 0)
            options = 0;
        if (options && i > 1 && takes_fd(args[i - 1]) && at[0] == '@') {
            long k = strtol(at + 1, NULL, 10);
            if (k < 0 || k >= nfds)
                usage("a request names a descriptor it did not bring", at);
            snprintf(numbers[k], sizeof numbers[k], "%d", fds[k]);
            args[i] = numbers[k];
        }
        at = stop + 1;
    }
    args[argc + 1] = NULL;
    while (at < end && n_env < SERVE_MAX_ARGS) {
        stop = memchr(at, '\0', (size_t)(end - at));
        if (stop == NULL)
            usage("a request's environment cut short", NULL);
        env[n_env++] = at;
        at = stop + 1;
    }
    env[n_env] = NULL;
    /* The job's environment is how its processes are found (JOBGATE_JOB_ID
       in /proc/PID/environ): the worker sends none bigger than the room. */
    if (!retitle(env_room, env_room_size, env))
        say("the job's environment does not fit in /proc/%d/environ", (int)getpid());
    (void)retitle(argv_room, argv_room_size, args);
    return keep((int)argc + 1, args, env);
}

/*
 * A spare: forked by the serving keeper ahead of the request it will take,
 * so that no fork() (about 0.2 ms of the serving keeper's time on the bench
 * host) stands between the worker's request and the job's start. It leads
 * its own session already and waits on the worker's socket. The first
 * request it reads is its own: it tells the serving keeper (NEWS_TOOK on
 * ``took``; the server forks another spare if none is left waiting),
 * answers the worker with its own pid and pidfd, and keeps that request's
 * job. A request too big to read whole is answered { -EMSGSIZE } and the
 * spare waits on. The worker's end of the socket closed, it exits with
 * SPARE_UNUSED. While it waits it dies with the serving keeper
 * (PR_SET_PDEATHSIG), so that a killed server starts nothing more; while it
 * keeps a job it is a keeper like any other, whatever becomes of the server.
 *
 * Once its job is over and the worker has answered that it recorded the
 * end (tell_worker()), the keeper waits for another request (NEWS_BACK), up
 * to --idle-ms, instead of exiting: the next start then costs no fork() and
 * no exit of a keeper (KeeperServer in worker/kept.py has the figures). It
 * closes every descriptor its job brought first, the lock of the job's user
 * id among them. An end that went to the exit file instead (the worker was
 * gone) ends the keeper, as does a server gone meanwhile.
 */
#define SPARE_UNUSED 3
/* --idle-ms: how long a keeper back from its job waits for another (0: it
   exits at once). */
static int idle_ms = 10000;

/* Waits up to ``timeout_ms`` (-1: for ever) for a request and reads it into
   ``request`` with its descriptors. Returns its length; 0 if none came in
   time; -1 if the worker's end is closed. */
static ssize_t
next_request(int sock, int timeout_ms, int *got, int *ngot)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * SERVE_MAX_FDS)];
    } control;
    struct msghdr m;
    struct iovec iov;
    struct cmsghdr *c;
    ssize_t n;

    for (;;) {
        if (timeout_ms >= 0) {
            /* Only the first of the keepers waiting reads a request; the
               others wait on (MSG_DONTWAIT below). */
            struct pollfd p = {.fd = sock, .events = POLLIN};
            int ready = poll(&p, 1, timeout_ms);

            if (ready < 0 && errno == EINTR)
                continue;
            if (ready == 0)
                return 0;
        }
        memset(&m, 0, sizeof m);
        iov.iov_base = request;
        iov.iov_len = SERVE_MAX_MESSAGE;
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        m.msg_control = control.buf;
        m.msg_controllen = sizeof control.buf;
        n = recvmsg(sock, &m, MSG_CMSG_CLOEXEC | (timeout_ms >= 0 ? MSG_DONTWAIT : 0));
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n <= 0)
            return -1; /* the worker closed its end, or is gone */
        *ngot = 0;
        for (c = CMSG_FIRSTHDR(&m); c != NULL; c = CMSG_NXTHDR(&m, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                if (count > SERVE_MAX_FDS - *ngot)
                    count = SERVE_MAX_FDS - *ngot;
                memcpy(got + *ngot, CMSG_DATA(c), sizeof(int) * (size_t)count);
                *ngot += count;
            }
        }
        if (!(m.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
            request[n] = '\0';
            return n;
        }
        {
            int32_t too_big = -EMSGSIZE;
            (void)!send(sock, &too_big, sizeof too_big, MSG_NOSIGNAL);
        }
        while (*ngot > 0)
            close(got[--*ngot]);
    }
}

/* The answer to the request taken: this keeper's pid and a pidfd of it. */
static void
answer_worker(int sock, int self_fd)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } control;
    int32_t answer = (int32_t)getpid();
    struct msghdr m;
    struct iovec iov;
    struct cmsghdr *c;

    memset(&m, 0, sizeof m);
    iov.iov_base = &answer;
    iov.iov_len = sizeof answer;
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    memset(&control, 0, sizeof control);
    m.msg_control = control.buf;
    m.msg_controllen = sizeof control.buf;
    c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &self_fd, sizeof(int));
    /* The worker may be gone already: the request is kept all the same, and
       the worker's next run finds the job again (its record). */
    while (sendmsg(sock, &m, MSG_NOSIGNAL) < 0 && errno == EINTR)
        ;
}

/* Every descriptor above 2 closed but those in ``keep`` (n of them). */
static void
close_all_but(const int *keep, int n)
{
    unsigned int from = 3;
    int i, lowest;

    for (;;) {
        lowest = -1;
        for (i = 0; i < n; i++)
            if (keep[i] >= (int)from && (lowest < 0 || keep[i] < lowest))
                lowest = keep[i];
        if (lowest < 0)
            break;
        if ((unsigned int)lowest > from)
            (void)syscall(SYS_close_range, from, (unsigned int)lowest - 1, 0);
        from = (unsigned int)lowest + 1;
    }
    (void)syscall(SYS_close_range, from, ~0U, 0);
}

static void __attribute__((noreturn))
spare(int sock, int took, pid_t server)
{
    static char *const title[] = {"jobgate-keeper", "--spare", NULL};
    static char *const none[] = {NULL};
    int got[SERVE_MAX_FDS], ngot = 0, self_fd, self_err, status, round;
    sigset_t all;
    ssize_t n;

    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    if (setsid() < 0)
        say("setsid: %s", strerror(errno));
    own_start = own_start_time();
    self_fd = (int)syscall(SYS_pidfd_open, getpid(), 0);
    self_err = self_fd < 0 ? errno : 0;
    took_fd = took;
    atexit(tell_took);
    for (round = 0;; round++) {
        int keep[] = {sock, took_fd, jobs_fd, self_fd};

        if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != server)
            _exit(1); /* the server is gone already, or cannot be followed */
        /* Shown by ps while it waits; the pages the request's arguments and
           environment go to (retitle()) are copied from the server's now
           rather than at the request. */
        (void)retitle(argv_room, argv_room_size, title);
        (void)retitle(env_room, env_room_size, none);
        if (round > 0)
            tell_server(NEWS_BACK);
        n = next_request(sock, round > 0 ? idle_ms : -1, got, &ngot);
        if (n == 0) {
            tell_server(NEWS_LEFT);
            _exit(0);
        }
        if (n < 0)
            _exit(SPARE_UNUSED);
        /* Taken: from here on it outlives the server, and the server forks
           another spare if none waits. A server that died meanwhile (its
           SIGKILL for this spare may not have landed yet) starts nothing
           more: the request is dropped unanswered, and the worker starts
           the job without it. */
        prctl(PR_SET_PDEATHSIG, 0);
        if (getppid() != server)
            _exit(1);
        took_told = 0;
        if (self_fd < 0) {
            /* A keeper the worker cannot watch must not run on unseen: it
               has not reported the job's start yet, and the worker gives it
               up. */
            int32_t cannot = -self_err;

            (void)!send(sock, &cannot, sizeof cannot, MSG_NOSIGNAL);
            tell_took();
            _exit(1);
        }
        answer_worker(sock, self_fd);
        status = serve_one(request, (size_t)n, got, ngot);
        if (!told_worker || idle_ms == 0)
            exit(status);
        told_worker = 0;
        close_all_but(keep, (int)(sizeof keep / sizeof keep[0]));
    }
}

/* The served keepers waiting for a request, back from a job (NEWS_BACK). */
#define IDLE_MAX 4096
static pid_t idle[IDLE_MAX];
static int n_idle;

/* Whether ``pid`` was waiting; it is not any more. */
static int
not_idle(pid_t pid)
{
    int i;

    for (i = 0; i < n_idle; i++) {
        if (idle[i] == pid) {
            idle[i] = idle[--n_idle];
            return 1;
        }
    }
    return 0;
}

/* What the served keepers told (struct news) since the last read. */
static void
read_news(int took_r, pid_t *spare_pid)
{
    struct news n;

    while (read(took_r, &n, sizeof n) == (ssize_t)sizeof n) {
        if (n.what == NEWS_BACK) {
            if (n_idle < IDLE_MAX)
                idle[n_idle++] = n.pid;
        } else if (n.pid == *spare_pid) {
            *spare_pid = -1; /* NEWS_TOOK */
        } else {
            (void)not_idle(n.pid);
        }
    }
}

static int
serve(int sock)
{
    struct sigaction ign;
    sigset_t chld;
    int sig_fd, took[2], failed = 0;
    pid_t spare_pid = -1, server = getpid();
    long long failed_at = 0;
    size_t k;

    memset(&ign, 0, sizeof ign);
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    for (k = 0; k < sizeof ignored / sizeof ignored[0]; k++)
        sigaction(ignored[k], &ign, NULL);
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    sig_fd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sig_fd < 0) {
        say("signalfd: %s", strerror(errno));
        return 1;
    }
    /* The served keepers' news (struct news). */
    if (pipe2(took, O_CLOEXEC | O_NONBLOCK) < 0) {
        say("pipe: %s", strerror(errno));
        return 1;
    }
    for (;;) {
        struct pollfd fds[2] = {{.fd = took[0], .events = POLLIN},
                                {.fd = sig_fd, .events = POLLIN}};
        int timeout = -1;

        /* Always one keeper waiting: a spare, or one back from its job. */
        if (spare_pid < 0 && n_idle == 0) {
            spare_pid = fork();
            if (spare_pid == 0) {
                close(sig_fd);
                close(took[0]);
                spare(sock, took[1], server);
            }
            if (spare_pid < 0) {
                /* Requests wait in the socket meanwhile; the worker gives
                   up on the server if none is answered in time. */
                say("cannot fork a spare keeper: %s", strerror(errno));
                timeout = 100;
            }
        }
        if (poll(fds, 2, timeout) < 0) {
            if (errno != EINTR)
                usleep(10 * 1000);
            continue;
        }
        read_news(took[0], &spare_pid);
        if (fds[1].revents) {
            struct signalfd_siginfo info;
            pid_t pid;
            int status;

            while (read(sig_fd, &info, sizeof info) > 0)
                ;
            while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
                /* What it told before it ended is in the pipe already. */
                read_news(took[0], &spare_pid);
                if (pid == spare_pid)
                    spare_pid = -1;
                else if (!not_idle(pid))
                    continue; /* a keeper whose job is over, or that left */
                if (WIFEXITED(status) && WEXITSTATUS(status) == SPARE_UNUSED)
                    goto done; /* the worker's end is closed */
                /* Killed while it waited (out of memory, say): fork another
                   if none waits, but do not spin if every one dies at once. */
                say("a spare keeper ended before it took a request (status %d)", status);
                if (now_ms() - failed_at > 1000)
                    failed = 0;
                failed_at = now_ms();
                if (++failed >= 5) {
                    say("spare keepers keep ending: the server gives up");
                    goto done;
                }
            }
        }
    }
done:
    while (waitpid(-1, NULL, WNOHANG) > 0)
        ;
    return 0;
}

int
main(int argc, char **argv)
{
    if (argc >= 3 && strcmp(argv[1], "--serve") == 0) {
        /* --serve FD [--jobs-dir FD] [--idle-ms MS] [ROOM]: ROOM, any text,
           makes argv's span longer, for the forked keepers' arguments; the
           environment's span is theirs too. */
        int sock = descriptor(argv[1], argv[2]), rest = 3;

        while (rest + 1 < argc && strncmp(argv[rest], "--", 2) == 0) {
            if (strcmp(argv[rest], "--jobs-dir") == 0)
                jobs_fd = descriptor(argv[rest], argv[rest + 1]);
            else if (strcmp(argv[rest], "--idle-ms") == 0)
                idle_ms = (int)number(argv[rest], argv[rest + 1], 3600LL * 1000);
            else
                usage("unknown option", argv[rest]);
            rest += 2;
        }
        if (argc > rest + 1)
            usage("--serve takes a descriptor, --jobs-dir, --idle-ms and at most a room",
                  NULL);
        argv_room = argv[0];
        argv_room_size = span(argv);
        if (environ != NULL && environ[0] != NULL) {
            env_room = environ[0];
            env_room_size = span(environ);
        }
        return serve(sock);
    }
    return keep(argc, argv, environ);
}
