/*
 * null_extproc: the least an ext_proc server can do for a GIE-style Envoy, as a floor reference for bench (b).
 *
 * Plain C on libnghttp2 and epoll, one thread, h2c. For every ProcessingRequest it sends the reply Envoy needs
 * to go on and nothing more: request headers → a canned headers reply that sets x-gateway-destination-endpoint
 * (header and envoy.lb metadata, like the EPP); request/response body → the body echoed back as a
 * FULL_DUPLEX_STREAMED streamed_response; response headers and trailers → an empty reply; after the last
 * response body, grpc-status 0. No JSON, no rules, no metrics, no logging. Whatever this costs per request on a
 * machine is the part of bench (b)'s figures that no ext_proc server can remove there.
 *
 * Usage: null_extproc PORT DESTINATION(ip:port)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

typedef struct {
    uint8_t *p;
    size_t len, cap, off;
} buf_t;

static void buf_reserve(buf_t *b, size_t extra) {
    if (b->len + extra <= b->cap) return;
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + extra) cap *= 2;
    b->p = realloc(b->p, cap);
    if (!b->p) abort();
    b->cap = cap;
}

static void buf_put(buf_t *b, const void *d, size_t n) {
    buf_reserve(b, n);
    memcpy(b->p + b->len, d, n);
    b->len += n;
}

static void buf_byte(buf_t *b, uint8_t v) { buf_put(b, &v, 1); }

static void buf_varint(buf_t *b, uint64_t v) {
    while (v >= 0x80) { buf_byte(b, (uint8_t)(v | 0x80)); v >>= 7; }
    buf_byte(b, (uint8_t)v);
}

static size_t varint_size(uint64_t v) { size_t n = 1; while (v >= 0x80) { v >>= 7; n++; } return n; }
static size_t field_size(size_t len) { return 1 + varint_size(len) + len; }
static void open_field(buf_t *b, int field, size_t len) { buf_byte(b, (uint8_t)(field << 3 | 2)); buf_varint(b, len); }

/* Drops consumed bytes so a long stream does not grow its buffer. */
static void buf_compact(buf_t *b) {
    if (b->off == 0) return;
    memmove(b->p, b->p + b->off, b->len - b->off);
    b->len -= b->off;
    b->off = 0;
}

typedef struct {
    buf_t in, out;
    int submitted, finished, health;
} stream_t;

typedef struct {
    int fd;
    nghttp2_session *session;
    buf_t pending; /* bytes nghttp2 produced that the socket did not take yet */
    int want_out;
} conn_t;

static buf_t headers_reply; /* built once: the gRPC frame of the request-headers reply */
static int epfd;

static void build_headers_reply(const char *dest) {
    static const char key[] = "x-gateway-destination-endpoint", ns[] = "envoy.lb";
    size_t kl = strlen(key), vl = strlen(dest);
    size_t header = field_size(kl) + field_size(vl);
    size_t option = field_size(header) + 2;
    size_t mutation = field_size(option), common = field_size(mutation), hr = field_size(common);
    size_t value = field_size(vl), entry = field_size(kl) + field_size(value), inner = field_size(entry);
    size_t outer_value = field_size(inner), outer_entry = field_size(strlen(ns)) + field_size(outer_value);
    size_t outer = field_size(outer_entry);
    size_t total = field_size(hr) + field_size(outer);
    buf_t *b = &headers_reply;
    buf_byte(b, 0);
    uint32_t n = htonl((uint32_t)total);
    buf_put(b, &n, 4);
    open_field(b, 1, hr);       /* ProcessingResponse.request_headers */
    open_field(b, 1, common);   /* HeadersResponse.response */
    open_field(b, 2, mutation); /* CommonResponse.header_mutation */
    open_field(b, 1, option);   /* HeaderMutation.set_headers */
    open_field(b, 1, header);   /* HeaderValueOption.header */
    open_field(b, 1, kl); buf_put(b, key, kl);   /* HeaderValue.key */
    open_field(b, 3, vl); buf_put(b, dest, vl);  /* HeaderValue.raw_value */
    buf_byte(b, 0x18); buf_byte(b, 2);           /* append_action OVERWRITE_IF_EXISTS_OR_ADD */
    open_field(b, 8, outer);       /* ProcessingResponse.dynamic_metadata */
    open_field(b, 1, outer_entry); /* Struct.fields entry */
    open_field(b, 1, strlen(ns)); buf_put(b, ns, strlen(ns));
    open_field(b, 2, outer_value); /* Value */
    open_field(b, 5, inner);       /* Value.struct_value */
    open_field(b, 1, entry);
    open_field(b, 1, kl); buf_put(b, key, kl);
    open_field(b, 2, value);
    open_field(b, 3, vl); buf_put(b, dest, vl); /* Value.string_value */
}

static int read_varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
    *v = 0;
    for (int shift = 0; *p < end && shift < 64; shift += 7) {
        uint8_t c = *(*p)++;
        *v |= (uint64_t)(c & 0x7f) << shift;
        if (!(c & 0x80)) return 0;
    }
    return -1;
}

/* Appends the FULL_DUPLEX_STREAMED echo of an HttpBody: {request|response}_body{response{body_mutation{
 * streamed_response{body, end_of_stream}}}}. Returns whether end_of_stream was set. */
static int echo_body(buf_t *out, int reply_field, const uint8_t *p, const uint8_t *end) {
    const uint8_t *body = NULL;
    uint64_t body_len = 0, eos = 0;
    while (p < end) {
        uint64_t tag, v;
        if (read_varint(&p, end, &tag)) return -1;
        if ((tag & 7) == 2) {
            if (read_varint(&p, end, &v) || v > (uint64_t)(end - p)) return -1;
            if (tag >> 3 == 1) { body = p; body_len = v; }
            p += v;
        } else if ((tag & 7) == 0) {
            if (read_varint(&p, end, &v)) return -1;
            if (tag >> 3 == 2) eos = v;
        } else return -1;
    }
    size_t streamed = (body_len ? field_size(body_len) : 0) + (eos ? 2 : 0);
    size_t mutation = field_size(streamed), common = field_size(mutation), br = field_size(common);
    size_t total = field_size(br);
    buf_byte(out, 0);
    uint32_t n = htonl((uint32_t)total);
    buf_put(out, &n, 4);
    open_field(out, reply_field, br);
    open_field(out, 1, common);
    open_field(out, 3, mutation);
    open_field(out, 3, streamed);
    if (body_len) { open_field(out, 1, body_len); buf_put(out, body, body_len); }
    if (eos) { buf_byte(out, 0x10); buf_byte(out, 1); }
    return (int)eos;
}

static void empty_reply(buf_t *out, int reply_field) {
    static const uint8_t prefix[5] = {0, 0, 0, 0, 2};
    buf_put(out, prefix, 5);
    buf_byte(out, (uint8_t)(reply_field << 3 | 2));
    buf_byte(out, 0);
}

/* One ProcessingRequest: the oneof field that says which phase it is decides the reply. */
static int handle_message(stream_t *st, const uint8_t *p, size_t len) {
    const uint8_t *end = p + len;
    while (p < end) {
        uint64_t tag, v;
        if (read_varint(&p, end, &tag)) return -1;
        if ((tag & 7) == 0) { if (read_varint(&p, end, &v)) return -1; continue; }
        if ((tag & 7) != 2) return -1;
        if (read_varint(&p, end, &v) || v > (uint64_t)(end - p)) return -1;
        const uint8_t *f = p;
        p += v;
        switch (tag >> 3) {
        case 2: buf_put(&st->out, headers_reply.p, headers_reply.len); break; /* request_headers */
        case 3: empty_reply(&st->out, 2); break;                              /* response_headers */
        case 4: if (echo_body(&st->out, 3, f, f + v) < 0) return -1; break;  /* request_body */
        case 5: {                                                             /* response_body */
            int eos = echo_body(&st->out, 4, f, f + v);
            if (eos < 0) return -1;
            if (eos) st->finished = 1;
            break;
        }
        case 6: empty_reply(&st->out, 5); break;                    /* request_trailers */
        case 7: empty_reply(&st->out, 6); st->finished = 1; break;  /* response_trailers */
        default: break; /* metadata_context, attributes, protocol_config, ... */
        }
    }
    return 0;
}

static ssize_t read_reply(nghttp2_session *s, int32_t id, uint8_t *dst, size_t length, uint32_t *flags,
                          nghttp2_data_source *src, void *user) {
    (void)user;
    stream_t *st = src->ptr;
    size_t left = st->out.len - st->out.off;
    if (left == 0) {
        st->out.len = st->out.off = 0;
        if (!st->finished) return NGHTTP2_ERR_DEFERRED;
        *flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
        nghttp2_nv trailer = {(uint8_t *)"grpc-status", (uint8_t *)"0", 11, 1, NGHTTP2_NV_FLAG_NONE};
        nghttp2_submit_trailer(s, id, &trailer, 1);
        return 0;
    }
    size_t n = left < length ? left : length;
    memcpy(dst, st->out.p + st->out.off, n);
    st->out.off += n;
    return (ssize_t)n;
}

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *frame, void *user) {
    (void)user;
    if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
        stream_t *st = calloc(1, sizeof *st);
        if (!st) abort();
        nghttp2_session_set_stream_user_data(s, frame->hd.stream_id, st);
    }
    return 0;
}

/* Envoy health-checks the ext_proc cluster with grpc.health.v1.Health/Check; it is answered SERVING. */
static int on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                     const uint8_t *value, size_t valuelen, uint8_t flags, void *user) {
    (void)flags; (void)user;
    static const char health[] = "/grpc.health.v1.Health/Check";
    stream_t *st = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);
    if (st && namelen == 5 && !memcmp(name, ":path", 5) && valuelen == sizeof health - 1 && !memcmp(value, health, valuelen))
        st->health = 1;
    return 0;
}

static int on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t id, const uint8_t *data, size_t len, void *user) {
    (void)flags; (void)user;
    stream_t *st = nghttp2_session_get_stream_user_data(s, id);
    if (!st) return 0;
    buf_put(&st->in, data, len);
    size_t before = st->out.len - st->out.off;
    while (st->in.len - st->in.off >= 5) {
        const uint8_t *m = st->in.p + st->in.off;
        uint32_t n = (uint32_t)m[1] << 24 | (uint32_t)m[2] << 16 | (uint32_t)m[3] << 8 | m[4];
        if (st->in.len - st->in.off - 5 < n) break;
        if (st->health) {
            static const uint8_t serving[] = {0, 0, 0, 0, 2, 0x08, 1}; /* HealthCheckResponse{status: SERVING} */
            buf_put(&st->out, serving, sizeof serving);
            st->finished = 1;
        } else if (m[0] != 0 || handle_message(st, m + 5, n) < 0) {
            nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, id, NGHTTP2_PROTOCOL_ERROR);
            return 0;
        }
        st->in.off += 5 + n;
    }
    buf_compact(&st->in);
    if (st->out.len - st->out.off == before && !st->finished) return 0;
    if (!st->submitted) {
        nghttp2_nv hdrs[] = {
            {(uint8_t *)":status", (uint8_t *)"200", 7, 3, NGHTTP2_NV_FLAG_NONE},
            {(uint8_t *)"content-type", (uint8_t *)"application/grpc", 12, 16, NGHTTP2_NV_FLAG_NONE},
        };
        nghttp2_data_provider prd = {.source.ptr = st, .read_callback = read_reply};
        nghttp2_submit_response(s, id, hdrs, 2, &prd);
        st->submitted = 1;
    } else {
        nghttp2_session_resume_data(s, id);
    }
    return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t id, uint32_t code, void *user) {
    (void)code; (void)user;
    stream_t *st = nghttp2_session_get_stream_user_data(s, id);
    if (st) {
        free(st->in.p);
        free(st->out.p);
        free(st);
    }
    return 0;
}

static void close_conn(conn_t *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    nghttp2_session_del(c->session);
    free(c->pending.p);
    free(c);
}

/* Writes what nghttp2 has queued in one write; what the socket refuses waits for EPOLLOUT. */
static int flush(conn_t *c) {
    const uint8_t *data;
    ssize_t n;
    while ((n = nghttp2_session_mem_send(c->session, &data)) > 0) buf_put(&c->pending, data, (size_t)n);
    if (n < 0) return -1;
    while (c->pending.off < c->pending.len) {
        ssize_t w = write(c->fd, c->pending.p + c->pending.off, c->pending.len - c->pending.off);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) break;
            return -1;
        }
        c->pending.off += (size_t)w;
    }
    int want_out = c->pending.off < c->pending.len;
    if (!want_out) c->pending.off = c->pending.len = 0;
    if (want_out != c->want_out) {
        struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = want_out;
    }
    if (!nghttp2_session_want_read(c->session) && !nghttp2_session_want_write(c->session)) return -1;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s PORT DESTINATION\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    build_headers_reply(argv[2]);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 128)) {
        perror("bind/listen");
        return 1;
    }
    nghttp2_session_callbacks *cbs;
    nghttp2_session_callbacks_new(&cbs);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
    /* Envoy resets every Process stream it is done with; nghttp2's rapid-reset budget (1000, 33/s) would end
     * the connection every ~1000 requests (the EPP raises it the same way). */
    nghttp2_option *opt;
    nghttp2_option_new(&opt);
    nghttp2_option_set_stream_reset_rate_limit(opt, 100000, 20000);
    epfd = epoll_create1(0);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &lev);
    static uint8_t rbuf[65536];
    for (;;) {
        struct epoll_event evs[64];
        int n = epoll_wait(epfd, evs, 64, -1);
        if (n < 0 && errno != EINTR) return 1;
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (!c) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    if (!c) abort();
                    c->fd = fd;
                    nghttp2_session_server_new2(&c->session, cbs, c, opt);
                    nghttp2_settings_entry s[] = {{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 1000},
                                                  {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20}};
                    nghttp2_submit_settings(c->session, NGHTTP2_FLAG_NONE, s, 2);
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
                    if (flush(c)) close_conn(c);
                }
                continue;
            }
            if (evs[i].events & EPOLLIN) {
                ssize_t r = read(c->fd, rbuf, sizeof rbuf);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) { close_conn(c); continue; }
                if (r > 0 && nghttp2_session_mem_recv(c->session, rbuf, (size_t)r) < 0) { close_conn(c); continue; }
            }
            if (flush(c)) close_conn(c);
        }
    }
}
