/*
 * stigmer-exec: run one sandbox command as the sandbox user; nothing it
 * starts outlives it.
 *
 * Threat model: the command is hostile. The agent (uid 0 with only CAP_SETUID,
 * CAP_SETGID, CAP_KILL) spawns this helper, which stays root, so the command,
 * running under an unprivileged uid, can neither signal, ptrace nor open
 * /proc/<pid>/fd of it. The helper is a child subreaper: every orphan of the
 * command reparents to it, so tree membership rests only on ppid links, which
 * the command cannot forge (session, process group and environment are never
 * trusted). The tree is killed in rounds (SIGSTOP every descendant, then
 * SIGKILL every one, so a fork bomb converges) until waitpid() says ECHILD;
 * each signal goes through a pidfd checked against the tree, so a recycled pid
 * is never hit. A zombie whose other threads still run (its main thread called
 * pthread_exit) is a live process: it is signalled like any other, and it
 * cannot be reaped before its threads end. Signals are blocked and taken with
 * sigtimedwait(): none is lost, and every wait is bounded or driven by a signal.
 * The kill rounds are bounded by --kill-grace (the host's deadline budget
 * passes it; see stigmer_sandbox/runtime/guest/protocol.py).
 *
 * With --watch-parent the helper cancels (kills the tree) when the process that
 * started it dies: the agent passes it. `docker exec` (the fallback runner) does
 * not: there the helper's parent is runc, which exits as soon as it started it.
 *
 * With --spec-fd the helper is started before its command is known (the agent
 * keeps one ready, so a command does not wait for this program to be executed):
 * it reads the rest of its arguments from that fd, NUL-terminated, up to EOF, and
 * parses them exactly like a command line. The command's environment is then
 * only what --env gives, and --stdin-null / --merge-output set up its stdio
 * (the helper's own pipes were made before the command's options were known).
 * EOF before any byte: the agent did not need it; it exits 0 saying nothing.
 *
 * With --prestart-shell (and --spec-fd, --uid, --gid, --cwd) the helper also starts,
 * before its command is known, the child that runs most commands: `bash` as the
 * command's user, in that folder, stdin /dev/null, this helper's environment, waiting
 * for its script on a socket. It runs SHELL_PATH, a copy of /bin/bash its user may
 * execute but not read, so the kernel makes it non-dumpable: other processes of that
 * user (a hostile command's leftovers) cannot open its /proc/PID/fd to write into the
 * next command's output or script, nor ptrace it (a socket, besides, cannot be reopened
 * through /proc at all). $0 and $BASH still say /bin/bash. When the
 * command is `/bin/bash -c SCRIPT` (SCRIPT short) with that user, folder, environment
 * and stdin, SCRIPT goes to that shell, which evals it: bash's start (~1 ms) is off the
 * command's path. Otherwise, or when that shell is gone, it is killed and the command
 * starts as it would have.
 *
 * Nothing is printed except a one-line usage error (exit 125); the result is
 * one JSON line on --status-fd, and the exit status mirrors its exit_code.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define USAGE "usage: stigmer-exec [--uid N --gid N] [--cwd DIR] [--status-fd FD] " \
              "[--timeout SECONDS] [--kill-grace SECONDS] [--keep-background] [--watch-parent] " \
              "[--env NAME=VALUE]... [--stdin-null] [--merge-output] " \
              "(-- PROGRAM [ARGS...] | --spec-fd FD)"
#define SPEC_LIMIT (16 * 1024 * 1024) /* far above what one execve takes */
/* A prestarted shell reads its script a byte at a time (bash does on a socket): longer
 * scripts start a shell of their own. */
#define SHELL_SCRIPT_LIMIT 1024
#define SHELL_FD 3
#define SHELL_PATH "/usr/local/libexec/stigmer-sandbox/bash"
/* What the prestarted shell runs: the script from SHELL_FD (NUL-terminated), that fd
 * closed, the variable gone before the script runs; nothing at all on EOF. */
#define SHELL_BOOT "IFS= read -r -d '' __stigmer_script <&3 || exit 0; exec 3<&-; " \
                   "eval \"unset __stigmer_script; SECONDS=0; $__stigmer_script\""
#define PID_LIMIT (4 * 1024 * 1024) /* PID_MAX_LIMIT: no pid is larger */
#define SEC 1000000000LL
#define DEFAULT_KILL_GRACE 5.0      /* seconds; the agent always passes its budget's value */
#define MEMBER 1                    /* bits of tree.mark[pid] */
#define COUNTED 2

struct opts {
    long long uid, gid; /* -1: keep the helper's own ids */
    int status_fd;      /* -1: none */
    double timeout;     /* 0: none */
    double kill_grace;  /* bound on ending the tree once asked; 0: DEFAULT_KILL_GRACE */
    int keep_background;
    int watch_parent;   /* cancel when the parent dies (PR_SET_PDEATHSIG) */
    int stdin_null;     /* the command's stdin is /dev/null */
    int merge_output;   /* the command's stderr is its stdout */
    int spec_fd;        /* -1: the command is on the command line */
    int prestart_shell; /* with --spec-fd: start the shell before the command is known */
    const char *cwd;    /* entered as the command's user; NULL: stay */
    char **argv;        /* PROGRAM [ARGS...] */
    const char *path;   /* what is executed; NULL: PROGRAM, searched in PATH */
    char **env;         /* with --env (or a spec): the command's whole environment */
    size_t envc, envcap;
    char bad[200];      /* first usage error, "" if none */
};

struct result {
    pid_t pid;          /* main child, 0 if none was started */
    int status, reaped, timed_out, cancelled, killed;
    char error[512];
};

struct proc { pid_t pid, ppid; char state; };

struct tree {           /* one scan of /proc */
    unsigned char *mark; /* indexed by pid: MEMBER, COUNTED */
    struct proc *p;
    size_t n, cap;
};

enum step { SWITCH_IDS, EXEC, CHDIR, STDIO };   /* where the child failed */
struct start_error { int step, err; }; /* child -> parent, over the pipe */

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * SEC + t.tv_nsec;
}

/* Next signal of `set`, or 0 once `deadline` (monotonic ns; 0: none) passes. */
static int wait_signal(const sigset_t *set, long long deadline)
{
    for (;;) {
        struct timespec ts, *tp = NULL;
        long long left = 0;
        if (deadline) {
            left = deadline - now_ns();
            left = left > 0 ? left : 0; /* still take a signal already pending */
            ts.tv_sec = left / SEC;
            ts.tv_nsec = left % SEC;
            tp = &ts;
        }
        int sig = sigtimedwait(set, NULL, tp);
        if (sig > 0)
            return sig;
        if (deadline && left == 0)
            return 0; /* else EINTR, or EAGAIN just before the deadline: again */
    }
}

/* Reap every child that has exited; 1 once the helper has no child left. */
static int reap(struct result *r)
{
    for (;;) {
        int st;
        pid_t p = waitpid(-1, &st, WNOHANG | __WALL);
        if (p > 0 && p == r->pid) {
            r->status = st;
            r->reaped = 1;
        } else if (p == 0 || (p < 0 && errno != EINTR)) {
            return p < 0 && errno == ECHILD;
        }
    }
}

/* State and ppid from /proc/PID/stat; comm may hold spaces and ')'. */
static int read_stat(pid_t pid, char *state, pid_t *ppid)
{
    char path[32], buf[2048];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    int pp;
    if (!p || sscanf(p + 1, " %c %d", state, &pp) != 2 || pp < 0 || pp >= PID_LIMIT)
        return -1;
    *ppid = pp;
    return 0;
}

/* Whether a zombie thread-group leader still has a thread that runs: then the
 * process is alive (and holds its pid) until those threads end. */
static int has_live_threads(pid_t pid)
{
    char path[48], st;
    snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
    DIR *d = opendir(path);
    struct dirent *e;
    int live = 0;
    while (d && !live && (e = readdir(d))) {
        char *end;
        long tid = strtol(e->d_name, &end, 10);
        if (*end || tid <= 0 || tid == pid)
            continue;
        snprintf(path, sizeof path, "/proc/%d/task/%ld/stat", (int)pid, tid);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        char buf[512];
        ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
        if (fd >= 0)
            close(fd);
        if (n <= 0)
            continue;
        buf[n] = '\0';
        char *p = strrchr(buf, ')');
        int ppi;
        if (p && sscanf(p + 1, " %c %d", &st, &ppi) == 2 && st != 'Z' && st != 'X')
            live = 1;
    }
    if (d)
        closedir(d);
    return live;
}

/* Room for one more entry; 0 when out of memory (the round kills what it listed). */
static int room(struct tree *t)
{
    if (t->n < t->cap)
        return 1;
    size_t cap = t->cap ? 2 * t->cap : 1024;
    struct proc *p = realloc(t->p, cap * sizeof *p);
    if (!p)
        return 0;
    t->p = p;
    t->cap = cap;
    return 1;
}

/* Add `pid` as a member if its parent is still `parent` (a pid listed as a child may
 * have exited and been recycled since). */
static void add_child(struct tree *t, long pid, pid_t parent)
{
    char st;
    pid_t pp;
    if (pid <= 0 || pid >= PID_LIMIT || (t->mark[pid] & MEMBER) ||
        read_stat((pid_t)pid, &st, &pp) < 0 || pp != parent || !room(t))
        return;
    t->mark[pid] |= MEMBER;
    t->p[t->n++] = (struct proc){ (pid_t)pid, pp, st };
}

/* Add the children the kernel lists for each thread of `pid` (a child belongs to the
 * thread that forked it, so a zombie leader's live threads are read too). */
static void add_children(struct tree *t, pid_t pid)
{
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
    DIR *d = opendir(path);
    struct dirent *e;
    while (d && (e = readdir(d))) {
        char *end;
        long tid = strtol(e->d_name, &end, 10), child = -1;
        ssize_t n;
        if (*end || tid <= 0)
            continue;
        snprintf(path, sizeof path, "/proc/%d/task/%ld/children", (int)pid, tid);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        while (fd >= 0 && (n = read(fd, buf, sizeof buf)) > 0)
            for (ssize_t k = 0; k < n; k++)
                if (isdigit((unsigned char)buf[k])) /* PID_LIMIT: a number too big */
                    child = child < 0 ? buf[k] - '0'
                          : child < PID_LIMIT ? child * 10 + (buf[k] - '0') : PID_LIMIT;
                else if (child >= 0) {
                    add_child(t, child, pid);
                    child = -1;
                }
        if (child >= 0)
            add_child(t, child, pid);
        if (fd >= 0)
            close(fd);
    }
    if (d)
        closedir(d);
}

/* The helper's descendants from the kernel's lists of children, read from the helper
 * down: the work grows with the tree, not with every process in the container (150
 * other processes cost each kill ~1.5 ms). -1 when the kernel keeps no such lists. */
static int walk(struct tree *t, pid_t self)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", (int)self, (int)self);
    if (access(path, R_OK) != 0)
        return -1;
    t->mark[self] |= MEMBER;
    add_children(t, self);
    for (size_t i = 0; i < t->n; i++) /* t->n grows: each new member is read in turn */
        add_children(t, t->p[i].pid);
    return 0;
}

/* Mark the helper's descendants (by ppid links, as the kernel's children lists or a
 * listing of every process give them). */
static void scan(struct tree *t, pid_t self)
{
    for (size_t i = 0; i < t->n; i++)
        t->mark[t->p[i].pid] &= ~MEMBER;
    t->n = 0;
    if (walk(t, self) == 0)
        return;
    DIR *d = opendir("/proc");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        char *end, st;
        long pid = strtol(e->d_name, &end, 10);
        pid_t pp;
        if (*end || pid <= 0 || pid >= PID_LIMIT || read_stat((pid_t)pid, &st, &pp) < 0)
            continue;
        if (!room(t))
            break; /* out of memory: kill what was listed, list again next round */
        t->p[t->n++] = (struct proc){ (pid_t)pid, pp, st };
    }
    if (d)
        closedir(d);
    t->mark[self] |= MEMBER;
    for (int changed = 1; changed;) { /* until no pass adds a child of a member */
        changed = 0;
        for (size_t i = 0; i < t->n; i++)
            if (!(t->mark[t->p[i].pid] & MEMBER) && (t->mark[t->p[i].ppid] & MEMBER)) {
                t->mark[t->p[i].pid] |= MEMBER;
                changed = 1;
            }
    }
}

/* Signal pid only if it is still a descendant: pidfd first, then re-check its
 * parent, so a pid recycled after the scan is never signalled. */
static int signal_member(const struct tree *t, pid_t pid, int sig)
{
    char st;
    pid_t pp;
    int fd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (fd < 0) /* ENOSYS/EPERM: old kernel or seccomp profile; plain kill */
        return (errno == ENOSYS || errno == EPERM) && kill(pid, sig) == 0;
    int ok = read_stat(pid, &st, &pp) == 0 && (t->mark[pp] & MEMBER) &&
             syscall(SYS_pidfd_send_signal, fd, sig, NULL, 0) == 0;
    close(fd);
    return ok;
}

/* Whether scan entry i is a process to signal: a descendant that runs, or a zombie
 * leader whose threads still run. */
static int to_kill(const struct tree *t, size_t i, pid_t self)
{
    const struct proc *p = &t->p[i];
    if (p->pid == self || !(t->mark[p->pid] & MEMBER))
        return 0;
    return (p->state != 'Z' && p->state != 'X') || has_live_threads(p->pid);
}

/* Kill every descendant, repeating until none is left (bounded by `grace` s). */
static void kill_tree(struct tree *t, struct result *r, double grace)
{
    pid_t self = getpid();
    long long deadline = now_ns() + (long long)(grace * SEC);
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    for (;;) {
        /* No child left means no descendant: orphans are re-parented to this subreaper,
         * so a command that left nothing costs no /proc scan. */
        if (reap(r))
            return;
        scan(t, self);
        for (int pass = 0; pass < 2; pass++) /* freeze all, then kill all */
            for (size_t i = 0; i < t->n; i++) {
                pid_t p = t->p[i].pid;
                if (!to_kill(t, i, self))
                    continue;
                if (signal_member(t, p, pass ? SIGKILL : SIGSTOP) && pass && p != r->pid &&
                    !(t->mark[p] & COUNTED)) {
                    t->mark[p] |= COUNTED;
                    r->killed++;
                }
            }
        long long now = now_ns();
        if (now >= deadline) {
            if (!r->error[0])
                snprintf(r->error, sizeof r->error, "processes survived SIGKILL for %g s", grace);
            return;
        }
        wait_signal(&chld, now + 20 * 1000000LL < deadline ? now + 20 * 1000000LL : deadline);
    }
}

static void child(const struct opts *o, int errfd)
{
    struct start_error m = { 0, 0 };
    uid_t u = (uid_t)o->uid, ru, eu, su;
    gid_t g = (gid_t)o->gid, rg, eg, sg, groups[2];
    setsid();
    if (o->stdin_null) {
        int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (null < 0 || dup2(null, STDIN_FILENO) < 0) {
            m.step = STDIO;
            m.err = errno;
        }
    }
    if (!m.err && o->merge_output && dup2(STDOUT_FILENO, STDERR_FILENO) < 0) {
        m.step = STDIO;
        m.err = errno;
    }
    int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t ignored = write(fd, "1000", 4);
        (void)ignored;
        close(fd);
    }
    if (!m.err && o->uid >= 0) {
        if (setgroups(1, &g) || setresgid(g, g, g) || setresuid(u, u, u))
            m.err = errno;
        else if (getresuid(&ru, &eu, &su) || getresgid(&rg, &eg, &sg) || ru != u || eu != u ||
                 su != u || rg != g || eg != g || sg != g || getgroups(2, groups) != 1 ||
                 groups[0] != g || (u != 0 && setuid(0) == 0))
            m.err = EPERM;
    }
    if (!m.err && o->cwd && chdir(o->cwd)) { /* as the command's user: no root lookups */
        m.step = CHDIR;
        m.err = errno;
    }
    if (!m.err) {
        sigset_t none;
        for (int s = 1; s < NSIG; s++)
            signal(s, SIG_DFL); /* fails harmlessly for SIGKILL, SIGSTOP, libc's */
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        if (o->env)
            environ = o->env; /* execvp searches this PATH too, as for any exec */
        if (o->path)
            execv(o->path, o->argv);
        else
            execvp(o->argv[0], o->argv);
        m.step = EXEC;
        m.err = errno;
    }
    ssize_t ignored = write(errfd, &m, sizeof m);
    (void)ignored;
    _exit(m.step == EXEC && m.err == ENOENT ? 127 : 126);
}

/* Write the status line (bounded: 1 s for the fd to take it) and return code. */
static int report(int fd, const struct result *r, int code)
{
    char err[sizeof r->error * 6 + 3] = "null", sig[16] = "null", pid[16] = "null", line[4096];
    if (r->error[0]) {
        char *q = err;
        *q++ = '"';
        for (const unsigned char *c = (const unsigned char *)r->error; *c; c++)
            if (*c == '"' || *c == '\\')
                q += sprintf(q, "\\%c", *c);
            else if (*c < 0x20 || *c >= 0x7f)
                q += sprintf(q, "\\u%04x", *c);
            else
                *q++ = (char)*c;
        strcpy(q, "\"");
    }
    if (r->reaped && WIFSIGNALED(r->status))
        snprintf(sig, sizeof sig, "%d", WTERMSIG(r->status));
    if (r->pid > 0)
        snprintf(pid, sizeof pid, "%d", (int)r->pid);
    int n = snprintf(line, sizeof line,
                     "{\"exit_code\":%d,\"signal\":%s,\"timed_out\":%s,\"cancelled\":%s,"
                     "\"error\":%s,\"pid\":%s,\"killed\":%d}\n",
                     code, sig, r->timed_out ? "true" : "false", r->cancelled ? "true" : "false",
                     err, pid, r->killed);
    struct pollfd p = { .fd = fd, .events = POLLOUT };
    for (int off = 0; fd >= 0 && off < n && poll(&p, 1, 1000) == 1;) {
        ssize_t w = write(fd, line + off, n - off);
        if (w == 0 || (w < 0 && errno != EINTR && errno != EAGAIN))
            break;
        off += w > 0 ? (int)w : 0;
    }
    return code;
}

static int parse_id(const char *s, long long max, long long *out)
{
    char *end;
    if (!s || !isdigit((unsigned char)*s))
        return -1;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || v > (unsigned long long)max)
        return -1;
    *out = (long long)v;
    return 0;
}

/* Append NAME=VALUE to the command's environment (kept NULL-terminated); 0 on ENOMEM. */
static int env_add(struct opts *o, char *entry)
{
    if (o->envc + 1 >= o->envcap) {
        size_t cap = o->envcap ? 2 * o->envcap : 64;
        char **env = realloc(o->env, cap * sizeof *env);
        if (!env)
            return 0;
        o->env = env;
        o->envcap = cap;
    }
    o->env[o->envc++] = entry;
    o->env[o->envc] = NULL;
    return 1;
}

/* Strict parse; keeps going after an error so --status-fd is still known. `spec`:
 * these arguments came from --spec-fd (which they may not give again). */
static void parse(int argc, char **argv, struct opts *o, int spec)
{
    int i;
#define BAD(...) do { if (!o->bad[0]) snprintf(o->bad, sizeof o->bad, __VA_ARGS__); } while (0)
    for (i = 1; i < argc && strcmp(argv[i], "--") != 0; i++) {
        const char *a = argv[i], *v = argv[i + 1];
        long long n;
        int *flag = !strcmp(a, "--keep-background") ? &o->keep_background
                  : !strcmp(a, "--watch-parent")    ? &o->watch_parent
                  : !strcmp(a, "--stdin-null")      ? &o->stdin_null
                  : !strcmp(a, "--merge-output")    ? &o->merge_output
                  : !strcmp(a, "--prestart-shell")  ? &o->prestart_shell : NULL;
        if (flag) {
            if ((*flag)++)
                BAD("%s given twice", a);
            else if (spec && flag == &o->prestart_shell)
                BAD("--prestart-shell goes on the command line only");
            continue;
        }
        if (!strcmp(a, "--env")) {
            i++;
            if (!v || !strchr(v, '=') || *v == '=')
                BAD("--env needs one NAME=VALUE");
            else if (!env_add(o, (char *)v))
                BAD("--env: out of memory");
            continue;
        }
        if (!strcmp(a, "--spec-fd")) {
            i++;
            if (spec || o->spec_fd >= 0 || parse_id(v, INT_MAX, &n) < 0 || n < 3 ||
                fcntl((int)n, F_GETFD) < 0)
                BAD("--spec-fd needs one open fd >= 3, on the command line only");
            else
                o->spec_fd = (int)n;
            continue;
        }
        if (!strcmp(a, "--cwd")) {
            i++;
            if (o->cwd || !v || !*v)
                BAD("--cwd needs one folder");
            else
                o->cwd = v;
            continue;
        }
        if (strcmp(a, "--uid") && strcmp(a, "--gid") && strcmp(a, "--status-fd") &&
            strcmp(a, "--timeout") && strcmp(a, "--kill-grace")) {
            BAD("unknown option '%.40s'", a);
            continue;
        }
        i++; /* the value; v == NULL when it is missing */
        long long *slot = !strcmp(a, "--uid") ? &o->uid : !strcmp(a, "--gid") ? &o->gid : NULL;
        if (slot) {
            if (*slot >= 0 || parse_id(v, 4294967294LL, slot) < 0)
                BAD("%s needs one number in 0..4294967294", a);
        } else if (!strcmp(a, "--status-fd")) {
            int flags = -1;
            if (o->status_fd >= 0 || parse_id(v, INT_MAX, &n) < 0 || n < 3 ||
                (flags = fcntl((int)n, F_GETFD)) < 0)
                BAD("--status-fd needs one open fd >= 3");
            else if (fcntl((int)n, F_SETFD, flags | FD_CLOEXEC) == 0) /* never inherited */
                o->status_fd = (int)n;
        } else {
            double *seconds = a[2] == 't' ? &o->timeout : &o->kill_grace;
            double max = a[2] == 't' ? 1e9 : 3600;
            char *end = NULL;
            int digits = v && *v && !v[strspn(v, "0123456789.")];
            double t = digits ? strtod(v, &end) : 0;
            if (*seconds > 0 || !digits || *end || !(t > 0 && t <= max))
                BAD("%s needs one number of seconds in (0, %g]", a, max);
            else
                *seconds = t;
        }
    }
    if ((o->uid < 0) != (o->gid < 0))
        BAD("--uid and --gid go together");
    if (o->prestart_shell && !spec && (o->spec_fd < 0 || o->uid < 0 || !o->cwd))
        BAD("--prestart-shell goes with --spec-fd, --uid, --gid and --cwd, on the command line");
    if (o->spec_fd >= 0 && !spec) {
        if (i < argc)
            BAD("--spec-fd reads the command from its fd: nothing after '--'");
    } else if (i + 1 >= argc)
        BAD(i >= argc ? "missing '--' before PROGRAM" : "missing PROGRAM after '--'");
    else
        o->argv = argv + i + 1;
#undef BAD
}

/* The arguments a --spec-fd gives: every NUL-terminated string up to EOF, after
 * argv0 (argc 0: EOF before any byte). The fd is closed: the command never has it. */
static char **read_spec(int fd, char *argv0, int *argc, char *bad, size_t bad_size)
{
    size_t size = 0, cap = 4096;
    char *buf = malloc(cap);
    ssize_t n;
    *argc = 0;
    while (buf && (n = read(fd, buf + size, cap - size)) != 0) {
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 || size + (size_t)n >= SPEC_LIMIT) {
            snprintf(bad, bad_size, n < 0 ? "--spec-fd: read failed" : "--spec-fd: too long");
            close(fd);
            return NULL;
        }
        size += (size_t)n;
        if (size == cap && !(buf = realloc(buf, cap *= 2)))
            break;
    }
    close(fd);
    if (!buf) {
        snprintf(bad, bad_size, "--spec-fd: out of memory");
        return NULL;
    }
    if (size == 0)
        return NULL;
    if (buf[size - 1] != '\0') {
        snprintf(bad, bad_size, "--spec-fd: the last argument has no NUL");
        return NULL;
    }
    size_t count = 1;
    for (size_t i = 0; i < size; i++)
        count += buf[i] == '\0';
    char **args = calloc(count + 1, sizeof *args);
    if (!args) {
        snprintf(bad, bad_size, "--spec-fd: out of memory");
        return NULL;
    }
    args[0] = argv0;
    for (size_t i = 0, k = 1; i < size; i += strlen(buf + i) + 1)
        args[k++] = buf + i;
    *argc = (int)count;
    return args;
}

/* The shell started before its command (--prestart-shell), and what it was started as. */
struct shell {
    pid_t pid;          /* 0: none */
    int script_fd, error_fd;
    long long uid, gid;
    const char *cwd;
};

/* An fd moved to >= 10, close-on-exec (so dup2 onto SHELL_FD never meets it). */
static int high_fd(int fd)
{
    int moved = fcntl(fd, F_DUPFD_CLOEXEC, 10);
    close(fd);
    return moved;
}

/* Start the shell the next command will most likely be (see --prestart-shell): it is
 * made now, with the ids and folder of the command line, and those are cleared so the
 * spec gives the command's own. Nothing is started when anything fails. */
static void prestart(struct opts *o, struct shell *sh)
{
    static char *shell_argv[] = { "/bin/bash", "-c", SHELL_BOOT, NULL };
    sigset_t chld;
    int sv[2], ep[2];
    sh->uid = o->uid, sh->gid = o->gid, sh->cwd = o->cwd;
    o->uid = o->gid = -1, o->cwd = NULL;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL); /* its early end is a signal kept for later */
    fcntl(o->spec_fd, F_SETFD, FD_CLOEXEC); /* the shell never holds the spec */
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        return;
    if (pipe2(ep, O_CLOEXEC | O_NONBLOCK) < 0) {
        close(sv[0]);
        close(sv[1]);
        return;
    }
    for (int i = 0; i < 2; i++)
        sv[i] = high_fd(sv[i]), ep[i] = high_fd(ep[i]);
    struct opts c = *o;
    c.uid = sh->uid, c.gid = sh->gid, c.cwd = sh->cwd;
    c.stdin_null = 1, c.merge_output = 0, c.env = NULL, c.argv = shell_argv, c.path = SHELL_PATH;
    pid_t pid = sv[0] < 0 || sv[1] < 0 || ep[0] < 0 || ep[1] < 0 ? -1 : fork();
    if (pid == 0) {
        if (dup2(sv[1], SHELL_FD) < 0)
            _exit(126);
        child(&c, ep[1]);
    }
    close(sv[1]);
    close(ep[1]);
    if (pid < 0) {
        close(sv[0]);
        close(ep[0]);
        return;
    }
    sh->pid = pid, sh->script_fd = sv[0], sh->error_fd = ep[0];
}

/* Whether the command is one the prestarted shell can run exactly as a new one would. */
static int shell_fits(const struct opts *o, const struct shell *sh)
{
    char **a = o->argv;
    if (o->uid != sh->uid || o->gid != sh->gid || !o->cwd || strcmp(o->cwd, sh->cwd) ||
        !o->stdin_null || !a || !a[0] || strcmp(a[0], "/bin/bash") || !a[1] ||
        strcmp(a[1], "-c") || !a[2] || a[3] || strlen(a[2]) > SHELL_SCRIPT_LIMIT)
        return 0;
    size_t k = 0; /* the same environment, entry for entry */
    for (; environ[k]; k++)
        if (k >= o->envc || strcmp(environ[k], o->env[k]))
            return 0;
    return k == o->envc;
}

/* End the prestarted shell without waiting for it (a command that is not for it must
 * not wait either): it is one of the helper's children, reaped with the rest of the
 * tree, or by init once the helper has exited. */
static void drop_shell(struct shell *sh)
{
    if (sh->pid > 0) {
        kill(sh->pid, SIGKILL);
        if (sh->script_fd >= 0)
            close(sh->script_fd);
        close(sh->error_fd);
    }
    sh->pid = 0;
}

/* Give the command's script to the prestarted shell; 0 when it is gone (then it is
 * reaped, and the command starts as it would have). */
static int hand_over(const struct opts *o, struct shell *sh)
{
    const char *prefix = o->merge_output ? "exec 2>&1; " : "";
    size_t n = strlen(prefix) + strlen(o->argv[2]) + 1;
    char script[sizeof "exec 2>&1; " + SHELL_SCRIPT_LIMIT];
    snprintf(script, sizeof script, "%s%s", prefix, o->argv[2]);
    if (waitpid(sh->pid, NULL, WNOHANG | __WALL) != 0) { /* ended (killed?) while it waited */
        close(sh->script_fd);
        close(sh->error_fd);
        sh->pid = 0; /* reaped (or not ours to wait for): never signalled again */
        return 0;
    }
    ssize_t sent = send(sh->script_fd, script, n, MSG_NOSIGNAL); /* with its NUL */
    close(sh->script_fd);
    sh->script_fd = -1;
    return sent == (ssize_t)n;
}

int main(int argc, char **argv)
{
    struct opts o = { .uid = -1, .gid = -1, .status_fd = -1, .spec_fd = -1 };
    struct result r = { 0 };
    struct tree t = { 0 };
    struct shell sh = { 0 };
    pid_t parent = getppid();
    static const int waited[] = { SIGCHLD, SIGTERM, SIGINT, SIGHUP };
    sigset_t set;
    int ep[2];

    signal(SIGPIPE, SIG_IGN); /* a closed status pipe must not kill the helper */
    parse(argc, argv, &o, 0);
    if (!o.bad[0] && o.spec_fd >= 0) {
        /* Before signals are blocked: while it waits, SIGTERM (the agent's death, with
         * --watch-parent) ends it at once; EOF ends it too. */
        if (o.watch_parent)
            prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (o.watch_parent && getppid() != parent)
            return 0;
        if (o.prestart_shell)
            prestart(&o, &sh);
        int spec_argc;
        char **spec = read_spec(o.spec_fd, argv[0], &spec_argc, o.bad, sizeof o.bad);
        if (!spec && !o.bad[0]) {
            drop_shell(&sh);
            return 0; /* not needed after all: no command, no status */
        }
        if (spec)
            parse(spec_argc, spec, &o, 1);
        if (!o.bad[0] && !o.env && !(o.env = calloc(1, sizeof *o.env)))
            snprintf(o.bad, sizeof o.bad, "out of memory"); /* no --env: an empty one */
        if (o.bad[0] || (sh.pid > 0 && !shell_fits(&o, &sh)))
            drop_shell(&sh);
    }
    if (o.bad[0]) {
        dprintf(STDERR_FILENO, "stigmer-exec: %s (%s)\n", o.bad, USAGE);
        snprintf(r.error, sizeof r.error, "usage: %s", o.bad);
        return report(o.status_fd, &r, 125);
    }
    sigemptyset(&set);
    for (int i = 0; i < 4; i++)
        sigaddset(&set, waited[i]);
    sigprocmask(SIG_BLOCK, &set, NULL);
    for (int i = 0; i < 4; i++) /* an inherited SIG_IGN for SIGCHLD would auto-reap */
        signal(waited[i], SIG_DFL);
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    if (o.watch_parent)
        prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (o.watch_parent && getppid() != parent) {
        drop_shell(&sh);
        r.cancelled = 1;
        snprintf(r.error, sizeof r.error, "parent exited before the command started");
        return report(o.status_fd, &r, 126);
    }
    t.mark = calloc(PID_LIMIT, 1);
    if (t.mark && sh.pid > 0 && hand_over(&o, &sh)) {
        r.pid = sh.pid; /* the shell runs the script; its start errors are long known */
        ep[0] = sh.error_fd;
    } else {
        drop_shell(&sh);
        if (!t.mark || pipe2(ep, O_CLOEXEC | O_NONBLOCK) < 0) {
            snprintf(r.error, sizeof r.error, "setup: %s", strerror(errno));
            return report(o.status_fd, &r, 126);
        }
        r.pid = fork();
        if (r.pid < 0) {
            r.pid = 0;
            snprintf(r.error, sizeof r.error, "fork: %s", strerror(errno));
            return report(o.status_fd, &r, 126);
        }
        if (r.pid == 0)
            child(&o, ep[1]);
        close(ep[1]);
    }

    long long deadline = o.timeout > 0 ? now_ns() + (long long)(o.timeout * SEC) : 0;
    while (!r.reaped && !r.timed_out && !r.cancelled) {
        int sig = wait_signal(&set, deadline);
        if (sig == SIGCHLD)
            reap(&r);
        else if (sig == 0)
            r.timed_out = 1;
        else
            r.cancelled = 1; /* SIGTERM/SIGINT/SIGHUP: the agent cancels, or died */
    }
    if (!r.reaped || !o.keep_background) /* timed out, cancelled, or the default */
        kill_tree(&t, &r, o.kill_grace > 0 ? o.kill_grace : DEFAULT_KILL_GRACE);

    struct start_error m;
    int code = r.timed_out ? 124 : !r.reaped ? 128 + SIGKILL
             : WIFSIGNALED(r.status) ? 128 + WTERMSIG(r.status) : WEXITSTATUS(r.status);
    if (r.reaped && read(ep[0], &m, sizeof m) == (ssize_t)sizeof m) {
        code = m.step == EXEC && m.err == ENOENT ? 127 : 126;
        if (m.step == EXEC)
            snprintf(r.error, sizeof r.error, "%.200s: %s", o.argv[0], strerror(m.err));
        else if (m.step == CHDIR)
            snprintf(r.error, sizeof r.error, "cd: %.200s: %s", o.cwd, strerror(m.err));
        else if (m.step == STDIO)
            snprintf(r.error, sizeof r.error, "stdio: %s", strerror(m.err));
        else
            snprintf(r.error, sizeof r.error, "cannot run as uid %lld gid %lld: %s", o.uid, o.gid,
                     strerror(m.err));
    }
    return report(o.status_fd, &r, code);
}
