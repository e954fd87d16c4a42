/* SPDX-License-Identifier: Apache-2.0 */
/*
 * weft-cni's native launcher: what runtimes exec for every pod operation.
 *
 * A Python plugin pays an interpreter start (~10 ms) on every exec; this launcher starts in
 * well under a millisecond and hands the whole invocation to the node's agent, which runs the
 * plugin's own code (weft.cni.plugin, the one implementation of the CNI semantics) on it:
 *
 *   1. read stdin (the network configuration) and the CNI_* environment;
 *   2. find the agent's socket: the configuration's top-level "agentSocket", else the default;
 *   3. send {"method":"cni.exec","params":{"env":{NAME:base64},"stdin":base64,"netns":[dev,ino]}}
 *      and read {"result":{"exit":N,"stdout":base64}}; write stdout, exit with N.
 *
 * Whenever that path is not certain (a configuration it cannot read, no agent, an error answer,
 * no answer in time), it execs the Python plugin next to it (<this file>.py) with the same
 * stdin and environment, which gives every answer the spec asks for (queued DELs, code 11,
 * parse errors...). Standard C library only.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/weft/agent.sock"
#define MAX_STDIN (4 << 20)
#define MAX_ANSWER (16 << 20)
#define CONNECT_TIMEOUT_MS 2000
#define ANSWER_TIMEOUT_MS 60000

extern char **environ;

struct buf {
	char *data;
	size_t len, cap;
};

static int buf_put(struct buf *b, const char *data, size_t len)
{
	if (b->len + len + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		char *grown;

		while (cap < b->len + len + 1)
			cap *= 2;
		grown = realloc(b->data, cap);
		if (!grown)
			return -1;
		b->data = grown;
		b->cap = cap;
	}
	memcpy(b->data + b->len, data, len);
	b->len += len;
	b->data[b->len] = 0;
	return 0;
}

static int buf_puts(struct buf *b, const char *s)
{
	return buf_put(b, s, strlen(s));
}

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int buf_base64(struct buf *b, const unsigned char *in, size_t len)
{
	char quad[4];

	for (size_t i = 0; i < len; i += 3) {
		unsigned v = (unsigned)in[i] << 16;

		if (i + 1 < len)
			v |= (unsigned)in[i + 1] << 8;
		if (i + 2 < len)
			v |= in[i + 2];
		quad[0] = B64[(v >> 18) & 63];
		quad[1] = B64[(v >> 12) & 63];
		quad[2] = i + 1 < len ? B64[(v >> 6) & 63] : '=';
		quad[3] = i + 2 < len ? B64[v & 63] : '=';
		if (buf_put(b, quad, 4) < 0)
			return -1;
	}
	return 0;
}

static int b64_value(char c)
{
	const char *p = c ? strchr(B64, c) : NULL;

	return p ? (int)(p - B64) : -1;
}

/* Decode base64 from `in` up to its closing quote into `out` (which is large enough). */
static long base64_decode(const char *in, unsigned char *out)
{
	long n = 0;
	unsigned v = 0;
	int bits = 0;

	for (; *in && *in != '"'; in++) {
		int d;

		if (*in == '=')
			continue;
		d = b64_value(*in);
		if (d < 0)
			return -1;
		v = (v << 6) | (unsigned)d;
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			out[n++] = (unsigned char)((v >> bits) & 0xff);
		}
	}
	return *in == '"' ? n : -1;
}

/* --- the configuration's top-level "agentSocket", by a small JSON scanner ----------------- */

static const char *skip_ws(const char *p)
{
	while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
		p++;
	return p;
}

/* Past the end of the string starting at *p == '"'; copies its value into out (ASCII escapes
 * only) when out is given. NULL when malformed or when out would need more than outlen. */
static const char *scan_string(const char *p, char *out, size_t outlen)
{
	size_t n = 0;

	if (*p++ != '"')
		return NULL;
	while (*p && *p != '"') {
		char c = *p++;

		if ((unsigned char)c < 0x20)
			return NULL;
		if (c == '\\') {
			c = *p++;
			switch (c) {
			case '"': case '\\': case '/': break;
			case 'b': c = '\b'; break;
			case 'f': c = '\f'; break;
			case 'n': c = '\n'; break;
			case 'r': c = '\r'; break;
			case 't': c = '\t'; break;
			case 'u':
				/* Not needed for a socket path: leave such a configuration to the plugin. */
				if (out)
					return NULL;
				for (int i = 0; i < 4; i++)
					if (!*p++)
						return NULL;
				continue;
			default:
				return NULL;
			}
		}
		if (out) {
			if (n + 1 >= outlen)
				return NULL;
			out[n++] = c;
		}
	}
	if (*p != '"')
		return NULL;
	if (out)
		out[n] = 0;
	return p + 1;
}

static const char *scan_value(const char *p, int depth);

static const char *scan_container(const char *p, int depth, char open, char close)
{
	if (depth > 64 || *p != open)
		return NULL;
	p = skip_ws(p + 1);
	if (*p == close)
		return p + 1;
	for (;;) {
		if (open == '{') {
			p = scan_string(p, NULL, 0);
			if (!p)
				return NULL;
			p = skip_ws(p);
			if (*p++ != ':')
				return NULL;
			p = skip_ws(p);
		}
		p = scan_value(p, depth + 1);
		if (!p)
			return NULL;
		p = skip_ws(p);
		if (*p == close)
			return p + 1;
		if (*p++ != ',')
			return NULL;
		p = skip_ws(p);
	}
}

static const char *scan_value(const char *p, int depth)
{
	if (*p == '"')
		return scan_string(p, NULL, 0);
	if (*p == '{')
		return scan_container(p, depth, '{', '}');
	if (*p == '[')
		return scan_container(p, depth, '[', ']');
	if (!*p)
		return NULL;
	/* numbers, true, false, null: up to the next delimiter */
	while (*p && !strchr(",}] \t\r\n", *p))
		p++;
	return p;
}

/* 0: found (or absent: default); -1: the configuration is not what this scanner can vouch for. */
static int agent_socket(const char *conf, char *out, size_t outlen)
{
	const char *p = skip_ws(conf);
	int found = 0;

	snprintf(out, outlen, "%s", DEFAULT_SOCKET);
	if (*p++ != '{')
		return -1;
	p = skip_ws(p);
	if (*p == '}')
		return 0;
	for (;;) {
		char key[64];
		const char *after = scan_string(p, key, sizeof(key));

		if (!after) {
			key[0] = 0;
			after = scan_string(p, NULL, 0);
			if (!after)
				return -1;
		}
		p = skip_ws(after);
		if (*p++ != ':')
			return -1;
		p = skip_ws(p);
		if (strcmp(key, "agentSocket") == 0) {
			if (found || *p != '"')
				return -1;
			p = scan_string(p, out, outlen);
			if (!p || !out[0])
				return -1;
			found = 1;
		} else {
			p = scan_value(p, 1);
			if (!p)
				return -1;
		}
		p = skip_ws(p);
		if (*p == '}')
			return *skip_ws(p + 1) ? -1 : 0;
		if (*p++ != ',')
			return -1;
		p = skip_ws(p);
	}
}

/* --- talking to the agent ----------------------------------------------------------------- */

static long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static int wait_fd(int fd, short events, long deadline)
{
	struct pollfd pfd = {.fd = fd, .events = events};
	long left = deadline - now_ms();
	int r;

	if (left <= 0)
		return -1;
	do
		r = poll(&pfd, 1, (int)left);
	while (r < 0 && errno == EINTR);
	return r == 1 ? 0 : -1;
}

static int connect_agent(const char *path)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	int fd;

	if (strlen(path) >= sizeof(addr.sun_path))
		return -1;
	strcpy(addr.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -1;
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0)
		return fd;
	if (errno == EINPROGRESS || errno == EAGAIN) {
		int err = 0;
		socklen_t len = sizeof(err);

		if (wait_fd(fd, POLLOUT, now_ms() + CONNECT_TIMEOUT_MS) == 0 &&
		    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0)
			return fd;
	}
	close(fd);
	return -1;
}

static int exchange(int fd, const struct buf *request, struct buf *answer)
{
	long deadline = now_ms() + ANSWER_TIMEOUT_MS;
	size_t sent = 0;
	char chunk[65536];

	while (sent < request->len) {
		ssize_t n;

		if (wait_fd(fd, POLLOUT, deadline) < 0)
			return -1;
		n = send(fd, request->data + sent, request->len - sent, MSG_NOSIGNAL);
		if (n < 0 && errno != EAGAIN && errno != EINTR)
			return -1;
		if (n > 0)
			sent += (size_t)n;
	}
	while (!answer->len || !memchr(answer->data, '\n', answer->len)) {
		ssize_t n;

		if (wait_fd(fd, POLLIN, deadline) < 0)
			return -1;
		n = recv(fd, chunk, sizeof(chunk), 0);
		if (n == 0)
			return -1;
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			return -1;
		}
		if (answer->len + (size_t)n > MAX_ANSWER || buf_put(answer, chunk, (size_t)n) < 0)
			return -1;
	}
	return 0;
}

/* The agent's answer, as the agent writes it: {"result": {"exit": N, "stdout": "<base64>"}}. */
static int parse_answer(const char *answer, int *status, unsigned char **out, long *outlen)
{
	const char *result = strstr(answer, "\"result\"");
	const char *exit_at, *stdout_at;

	if (!result || strstr(answer, "\"error\""))
		return -1;
	exit_at = strstr(result, "\"exit\":");
	stdout_at = strstr(result, "\"stdout\":");
	if (!exit_at || !stdout_at)
		return -1;
	exit_at = skip_ws(exit_at + 7);
	if (*exit_at < '0' || *exit_at > '9')
		return -1;
	*status = atoi(exit_at);
	stdout_at = skip_ws(stdout_at + 9);
	if (*stdout_at++ != '"')
		return -1;
	*out = malloc(strlen(stdout_at) + 1);
	if (!*out)
		return -1;
	*outlen = base64_decode(stdout_at, *out);
	return *outlen < 0 ? -1 : 0;
}

/* --- the fallback: the Python plugin, with the stdin already read ------------------------- */

static void exec_python_plugin(const struct buf *in)
{
	char self[PATH_MAX], fallback[PATH_MAX + 4];
	ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	int pipefd[2];
	pid_t pid;

	if (n <= 0)
		goto fail;
	self[n] = 0;
	snprintf(fallback, sizeof(fallback), "%s.py", self);
	/* The plugin reads stdin, which this process consumed: give it the same bytes. */
	if (pipe(pipefd) < 0)
		goto fail;
	pid = fork();
	if (pid < 0)
		goto fail;
	if (pid == 0) {
		size_t off = 0;

		close(pipefd[0]);
		while (off < in->len) {
			ssize_t w = write(pipefd[1], in->data + off, in->len - off);

			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0)
				_exit(1);
			off += (size_t)w;
		}
		_exit(0);
	}
	close(pipefd[1]);
	if (dup2(pipefd[0], STDIN_FILENO) < 0)
		goto fail;
	close(pipefd[0]);
	execl(fallback, fallback, (char *)NULL);
fail:
	printf("{\"cniVersion\": \"1.1.0\", \"code\": 100, \"msg\": \"weft-cni: cannot run the plugin\", "
	       "\"details\": \"%s\"}\n", strerror(errno));
	exit(1);
}

int main(void)
{
	struct buf in = {0}, request = {0}, answer = {0};
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)], chunk[65536], num[64];
	unsigned char *out = NULL;
	struct stat ns;
	long outlen = 0;
	int status, fd, first = 1;
	ssize_t n;

	while ((n = read(STDIN_FILENO, chunk, sizeof(chunk))) != 0) {
		if (n < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (in.len + (size_t)n > MAX_STDIN || buf_put(&in, chunk, (size_t)n) < 0)
			exec_python_plugin(&in);
	}
	if (!in.data && buf_puts(&in, "") < 0)
		exec_python_plugin(&in);
	if (memchr(in.data, 0, in.len) || agent_socket(in.data, path, sizeof(path)) < 0)
		exec_python_plugin(&in);
	if (stat("/proc/self/ns/net", &ns) < 0)
		exec_python_plugin(&in);

	if (buf_puts(&request, "{\"method\":\"cni.exec\",\"params\":{\"env\":{") < 0)
		exec_python_plugin(&in);
	for (char **e = environ; *e; e++) {
		const char *eq = strchr(*e, '=');

		if (strncmp(*e, "CNI_", 4) != 0 || !eq)
			continue;
		if ((!first && buf_puts(&request, ",") < 0) || buf_puts(&request, "\"") < 0)
			exec_python_plugin(&in);
		/* Names are [A-Z_]: nothing to escape; anything else goes the slow way. */
		for (const char *c = *e; c < eq; c++)
			if (!((*c >= 'A' && *c <= 'Z') || *c == '_' || (*c >= '0' && *c <= '9')))
				exec_python_plugin(&in);
		if (buf_put(&request, *e, (size_t)(eq - *e)) < 0 || buf_puts(&request, "\":\"") < 0 ||
		    buf_base64(&request, (const unsigned char *)eq + 1, strlen(eq + 1)) < 0 ||
		    buf_puts(&request, "\"") < 0)
			exec_python_plugin(&in);
		first = 0;
	}
	snprintf(num, sizeof(num), "[%llu,%llu]", (unsigned long long)ns.st_dev, (unsigned long long)ns.st_ino);
	if (buf_puts(&request, "},\"stdin\":\"") < 0 ||
	    buf_base64(&request, (const unsigned char *)in.data, in.len) < 0 ||
	    buf_puts(&request, "\",\"netns\":") < 0 || buf_puts(&request, num) < 0 || buf_puts(&request, "}}\n") < 0)
		exec_python_plugin(&in);

	fd = connect_agent(path);
	if (fd < 0 || exchange(fd, &request, &answer) < 0 || parse_answer(answer.data, &status, &out, &outlen) < 0)
		exec_python_plugin(&in);
	close(fd);
	for (long off = 0; off < outlen;) {
		n = write(STDOUT_FILENO, out + off, (size_t)(outlen - off));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return 1;
		off += n;
	}
	return status;
}
