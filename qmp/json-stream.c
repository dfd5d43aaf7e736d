/* strata — the QMP input splitter and JSON writer.
 *
 * QMP input is a stream of JSON texts with no framing: a text ends when
 * its brackets balance.  A byte-level lexer (QEMU's token grammar,
 * including single-quoted strings) feeds tokens to a splitter that counts
 * braces and brackets; when they balance — or go negative — the tokens
 * collected so far are parsed as one text.  A lexical error is reported
 * at once, drops the tokens collected so far, and the lexer skips to the
 * next structural or control character, as QEMU does, so the error
 * replies a client sees match QEMU's.
 *
 * json-glib's own parser knows neither single quotes nor QEMU's error
 * texts, so the small recursive-descent parser here builds json-glib
 * values from the tokens instead.
 *
 * Memory stays bounded: a text whose tokens exceed STRATA_JSON_MAX_TEXT
 * bytes, or that nests deeper than STRATA_JSON_MAX_DEPTH, gets one error
 * and the rest of it is skipped without being stored (only the nesting
 * depth and whether we are inside a string are tracked) until it closes.
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "strata-util.h"
#include "json-stream-private.h"

typedef enum {
    TOK_LCURLY,
    TOK_RCURLY,
    TOK_LSQUARE,
    TOK_RSQUARE,
    TOK_COLON,
    TOK_COMMA,
    TOK_STRING,
    TOK_INTEGER,
    TOK_FLOAT,
    TOK_KEYWORD,
} TokType;

typedef struct {
    guint32 type;           /* TokType */
    guint32 start, len;     /* in StrataJsonStream.text */
} Token;

typedef enum {
    S_START,
    S_RECOVERY,     /* after a lexical error: skip to a resync point */
    S_DISCARD,      /* after a limit error: skip the rest of the text */
    S_DQ, S_DQ_ESC,
    S_SQ, S_SQ_ESC,
    S_SIGN, S_ZERO, S_DIGITS,
    S_MANT, S_MANT_DIGITS,
    S_EXP_E, S_EXP_SIGN, S_EXP_DIGITS,
    S_KEYWORD,
} LexState;

struct StrataJsonStream {
    StrataJsonStreamFunc fn;
    void *opaque;
    LexState state;
    GString *text;          /* token bytes of the current text */
    size_t tok_start;
    GArray *tokens;         /* Token */
    int braces, brackets;
    /* S_DISCARD bookkeeping */
    long discard_depth;
    char discard_quote;     /* 0: not inside a string */
    bool discard_escape;
};

static void emit_error(StrataJsonStream *js, const char *fmt, ...)
    G_GNUC_PRINTF(2, 3);

static void reset_text(StrataJsonStream *js)
{
    g_string_truncate(js->text, 0);
    /* A huge text leaves a huge buffer behind; do not keep it. */
    if (js->text->allocated_len > 65536) {
        g_string_free(js->text, TRUE);
        js->text = g_string_sized_new(256);
    }
    g_array_set_size(js->tokens, 0);
    js->tok_start = 0;
    js->braces = js->brackets = 0;
}

static void emit_error(StrataJsonStream *js, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    g_autofree char *msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    js->fn(NULL, g_error_new_literal(STRATA_ERROR,
                                     STRATA_ERROR_INVALID_ARGUMENT, msg),
           js->opaque);
}

/* A limit was hit inside a text: report it once and skip the remainder
 * of the text without storing it. */
static void enter_discard(StrataJsonStream *js, const char *msg,
                          LexState was)
{
    long depth = (long)MAX(js->braces, 0) + MAX(js->brackets, 0);
    char quote = 0;

    if (was == S_DQ || was == S_DQ_ESC) {
        quote = '"';
    } else if (was == S_SQ || was == S_SQ_ESC) {
        quote = '\'';
    }
    emit_error(js, "%s", msg);
    reset_text(js);
    if (depth == 0 && !quote) {
        /* An oversized bare token at top level: ordinary recovery. */
        js->state = S_RECOVERY;
        return;
    }
    js->discard_depth = depth;
    js->discard_quote = quote;
    js->discard_escape = was == S_DQ_ESC || was == S_SQ_ESC;
    js->state = S_DISCARD;
}

static void discard_char(StrataJsonStream *js, unsigned char c)
{
    if (js->discard_quote) {
        if (js->discard_escape) {
            js->discard_escape = false;
        } else if (c == '\\') {
            js->discard_escape = true;
        } else if (c == (unsigned char)js->discard_quote) {
            js->discard_quote = 0;
        }
        return;
    }
    if (c == '"' || c == '\'') {
        js->discard_quote = (char)c;
    } else if (c == '{' || c == '[') {
        js->discard_depth++;
    } else if (c == '}' || c == ']') {
        if (--js->discard_depth <= 0) {
            js->state = S_START;
        }
    }
}

static JsonNode *parse_tokens(const char *text, const Token *toks, guint n,
                              GError **error);

static void finish_text(StrataJsonStream *js)
{
    GError *err = NULL;
    JsonNode *v = parse_tokens(js->text->str, (Token *)js->tokens->data,
                               js->tokens->len, &err);
    reset_text(js);
    js->fn(v, err, js->opaque);
}

static void emit_token(StrataJsonStream *js, TokType type)
{
    Token t = { type, (guint32)js->tok_start,
                (guint32)(js->text->len - js->tok_start) };

    js->state = S_START;
    g_array_append_val(js->tokens, t);
    switch (type) {
    case TOK_LCURLY:
        js->braces++;
        break;
    case TOK_RCURLY:
        js->braces--;
        break;
    case TOK_LSQUARE:
        js->brackets++;
        break;
    case TOK_RSQUARE:
        js->brackets--;
        break;
    default:
        break;
    }
    if (js->braces + js->brackets > STRATA_JSON_MAX_DEPTH) {
        enter_discard(js, "JSON nesting depth limit exceeded", S_START);
        return;
    }
    if (js->text->len > STRATA_JSON_MAX_TEXT) {
        enter_discard(js, "JSON token size limit exceeded", S_START);
        return;
    }
    if (js->tokens->len > STRATA_JSON_MAX_TOKENS) {
        enter_discard(js, "JSON token count limit exceeded", S_START);
        return;
    }
    if ((js->braces > 0 || js->brackets > 0) && js->braces >= 0 &&
        js->brackets >= 0) {
        return;
    }
    finish_text(js);
}

static void lex_error(StrataJsonStream *js)
{
    /* The stray text may hold any bytes; the writer escapes them. */
    g_autofree char *stray = g_strndup(js->text->str + js->tok_start,
                                       js->text->len - js->tok_start);
    reset_text(js);
    js->state = S_RECOVERY;
    emit_error(js, "JSON parse error, stray '%s'", stray);
}

static bool is_ws(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

static void feed_char(StrataJsonStream *js, unsigned char c)
{
    for (;;) {
        LexState st = js->state;

        switch (st) {
        case S_DISCARD:
            discard_char(js, c);
            return;
        case S_RECOVERY:
            if ((c < 0x20 && c != '\t') || c >= 0xFE || strchr("[]{}:,", c)) {
                js->state = S_START;
                continue;
            }
            return;
        case S_START:
            if (is_ws(c)) {
                return;
            }
            js->tok_start = js->text->len;
            g_string_append_c(js->text, (char)c);
            switch (c) {
            case '{': emit_token(js, TOK_LCURLY); return;
            case '}': emit_token(js, TOK_RCURLY); return;
            case '[': emit_token(js, TOK_LSQUARE); return;
            case ']': emit_token(js, TOK_RSQUARE); return;
            case ':': emit_token(js, TOK_COLON); return;
            case ',': emit_token(js, TOK_COMMA); return;
            case '"': js->state = S_DQ; break;
            case '\'': js->state = S_SQ; break;
            case '-': js->state = S_SIGN; break;
            case '0': js->state = S_ZERO; break;
            default:
                if (c >= '1' && c <= '9') {
                    js->state = S_DIGITS;
                } else if (c >= 'a' && c <= 'z') {
                    js->state = S_KEYWORD;
                } else {
                    lex_error(js);
                    return;
                }
            }
            break;
        case S_DQ:
        case S_SQ:
            g_string_append_c(js->text, (char)c);
            if (c < 0x20 || c >= 0xFE) {
                lex_error(js);
                return;
            }
            if (c == '\\') {
                js->state = st == S_DQ ? S_DQ_ESC : S_SQ_ESC;
            } else if (c == (st == S_DQ ? '"' : '\'')) {
                emit_token(js, TOK_STRING);
                return;
            }
            break;
        case S_DQ_ESC:
        case S_SQ_ESC:
            /* The parser judges the escape; the lexer only keeps the
             * string going. */
            g_string_append_c(js->text, (char)c);
            if (c < 0x20 || c >= 0xFE) {
                lex_error(js);
                return;
            }
            js->state = st == S_DQ_ESC ? S_DQ : S_SQ;
            break;
        case S_SIGN:
            g_string_append_c(js->text, (char)c);
            if (c == '0') {
                js->state = S_ZERO;
            } else if (c >= '1' && c <= '9') {
                js->state = S_DIGITS;
            } else {
                lex_error(js);
                return;
            }
            break;
        case S_ZERO:
        case S_DIGITS:
            if (g_ascii_isdigit(c)) {
                g_string_append_c(js->text, (char)c);
                if (st == S_ZERO) {
                    lex_error(js);
                    return;
                }
            } else if (c == '.') {
                g_string_append_c(js->text, (char)c);
                js->state = S_MANT;
            } else if (c == 'e' || c == 'E') {
                g_string_append_c(js->text, (char)c);
                js->state = S_EXP_E;
            } else {
                emit_token(js, TOK_INTEGER);
                continue;
            }
            break;
        case S_MANT:
            g_string_append_c(js->text, (char)c);
            if (!g_ascii_isdigit(c)) {
                lex_error(js);
                return;
            }
            js->state = S_MANT_DIGITS;
            break;
        case S_MANT_DIGITS:
        case S_EXP_DIGITS:
            if (g_ascii_isdigit(c)) {
                g_string_append_c(js->text, (char)c);
            } else if (st == S_MANT_DIGITS && (c == 'e' || c == 'E')) {
                g_string_append_c(js->text, (char)c);
                js->state = S_EXP_E;
            } else {
                emit_token(js, TOK_FLOAT);
                continue;
            }
            break;
        case S_EXP_E:
            g_string_append_c(js->text, (char)c);
            if (c == '+' || c == '-') {
                js->state = S_EXP_SIGN;
            } else if (g_ascii_isdigit(c)) {
                js->state = S_EXP_DIGITS;
            } else {
                lex_error(js);
                return;
            }
            break;
        case S_EXP_SIGN:
            g_string_append_c(js->text, (char)c);
            if (!g_ascii_isdigit(c)) {
                lex_error(js);
                return;
            }
            js->state = S_EXP_DIGITS;
            break;
        case S_KEYWORD:
            if (c >= 'a' && c <= 'z') {
                g_string_append_c(js->text, (char)c);
                break;
            }
            emit_token(js, TOK_KEYWORD);
            continue;
        }
        /* A character was stored: keep the text within its bound. */
        if (js->text->len > STRATA_JSON_MAX_TEXT) {
            enter_discard(js, "JSON token size limit exceeded", js->state);
        }
        return;
    }
}

StrataJsonStream *strata_json_stream_new(StrataJsonStreamFunc fn,
                                         void *opaque)
{
    StrataJsonStream *js;

    g_return_val_if_fail(fn != NULL, NULL);
    js = g_new0(StrataJsonStream, 1);
    js->fn = fn;
    js->opaque = opaque;
    js->state = S_START;
    js->text = g_string_sized_new(256);
    js->tokens = g_array_new(FALSE, FALSE, sizeof(Token));
    return js;
}

void strata_json_stream_free(StrataJsonStream *js)
{
    if (!js) {
        return;
    }
    g_string_free(js->text, TRUE);
    g_array_free(js->tokens, TRUE);
    g_free(js);
}

void strata_json_stream_feed(StrataJsonStream *js, const char *buf,
                             size_t len)
{
    g_return_if_fail(js != NULL);
    for (size_t i = 0; i < len; i++) {
        feed_char(js, (unsigned char)buf[i]);
    }
}

void strata_json_stream_flush(StrataJsonStream *js)
{
    g_return_if_fail(js != NULL);
    /* A space terminates a pending number or keyword without starting
     * anything; what is still open after that is dropped. */
    switch (js->state) {
    case S_ZERO:
    case S_DIGITS:
    case S_MANT_DIGITS:
    case S_EXP_DIGITS:
    case S_KEYWORD:
        feed_char(js, ' ');
        break;
    default:
        break;
    }
    reset_text(js);
    js->state = S_START;
}

size_t strata_json_stream_pending(StrataJsonStream *js)
{
    g_return_val_if_fail(js != NULL, 0);
    return js->text->len;
}

/* ------------------------------------------------------------------ */
/* Parser: tokens to json-glib values                                  */
/* ------------------------------------------------------------------ */

typedef struct {
    const char *text;
    const Token *toks;
    guint n, pos;
    GError *err;
} Parser;

static void perr(Parser *p, const char *msg)
{
    /* The first error is the one reported, as QEMU. */
    if (!p->err) {
        p->err = g_error_new(STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                             "JSON parse error, %s", msg);
    }
}

static const Token *peek(Parser *p)
{
    return p->pos < p->n ? &p->toks[p->pos] : NULL;
}

static const Token *next(Parser *p)
{
    return p->pos < p->n ? &p->toks[p->pos++] : NULL;
}

static JsonNode *parse_value(Parser *p);

static int hexval(char c)
{
    return g_ascii_xdigit_value(c);
}

static bool read_hex4(const char *s, const char *end, gunichar *out)
{
    gunichar v = 0;

    if (end - s < 4) {
        return false;
    }
    for (int i = 0; i < 4; i++) {
        int d = hexval(s[i]);
        if (d < 0) {
            return false;
        }
        v = v * 16 + (gunichar)d;
    }
    *out = v;
    return true;
}

static JsonNode *parse_string(Parser *p, const Token *t)
{
    const char *s = p->text + t->start + 1;
    const char *end = p->text + t->start + t->len - 1;
    g_autoptr(GString) out = g_string_sized_new(t->len);

    while (s < end) {
        if (*s != '\\') {
            g_string_append_c(out, *s++);
            continue;
        }
        s++;
        switch (*s) {
        case '"': case '\'': case '\\': case '/':
            g_string_append_c(out, *s);
            s++;
            break;
        case 'b': g_string_append_c(out, '\b'); s++; break;
        case 'f': g_string_append_c(out, '\f'); s++; break;
        case 'n': g_string_append_c(out, '\n'); s++; break;
        case 'r': g_string_append_c(out, '\r'); s++; break;
        case 't': g_string_append_c(out, '\t'); s++; break;
        case 'u': {
            gunichar cp, lo;
            if (!read_hex4(s + 1, end, &cp)) {
                perr(p, "invalid hex escape sequence in string");
                return NULL;
            }
            s += 5;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (end - s >= 6 && s[0] == '\\' && s[1] == 'u' &&
                    read_hex4(s + 2, end, &lo) && lo >= 0xDC00 &&
                    lo <= 0xDFFF) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    s += 6;
                } else {
                    perr(p, "invalid \\u escape sequence in string");
                    return NULL;
                }
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                perr(p, "invalid \\u escape sequence in string");
                return NULL;
            }
            if (cp == 0) {
                perr(p, "\\u0000 is not supported");
                return NULL;
            }
            g_string_append_unichar(out, cp);
            break;
        }
        default:
            perr(p, "invalid escape sequence in string");
            return NULL;
        }
    }
    if (!g_utf8_validate(out->str, (gssize)out->len, NULL)) {
        perr(p, "invalid UTF-8 sequence in string");
        return NULL;
    }
    JsonNode *n = json_node_alloc();
    json_node_init_string(n, out->str);
    return n;
}

static JsonNode *parse_number(Parser *p, const Token *t)
{
    g_autofree char *s = g_strndup(p->text + t->start, t->len);
    JsonNode *n = json_node_alloc();

    if (t->type == TOK_INTEGER) {
        char *e;
        errno = 0;
        gint64 v = g_ascii_strtoll(s, &e, 10);
        if (errno == 0 && *e == '\0') {
            return json_node_init_int(n, v);
        }
        /* Out of int64 range: a double, as QEMU falls back to one. */
    }
    return json_node_init_double(n, g_ascii_strtod(s, NULL));
}

static JsonNode *parse_keyword(Parser *p, const Token *t)
{
    g_autofree char *s = g_strndup(p->text + t->start, t->len);

    if (!strcmp(s, "true") || !strcmp(s, "false")) {
        return json_node_init_boolean(json_node_alloc(), s[0] == 't');
    }
    if (!strcmp(s, "null")) {
        return json_node_init_null(json_node_alloc());
    }
    g_autofree char *msg = g_strdup_printf("invalid keyword '%s'", s);
    perr(p, msg);
    return NULL;
}

static bool parse_pair(Parser *p, JsonObject *obj)
{
    const Token *t = peek(p);
    g_autoptr(JsonNode) key = parse_value(p);
    g_autoptr(JsonNode) value = NULL;

    if (!key) {
        return false;
    }
    if (!t || t->type != TOK_STRING) {
        perr(p, "key is not a string in object");
        return false;
    }
    t = next(p);
    if (!t) {
        perr(p, "premature EOI");
        return false;
    }
    if (t->type != TOK_COLON) {
        perr(p, "missing : in object pair");
        return false;
    }
    value = parse_value(p);
    if (!value) {
        perr(p, "Missing value in dict");
        return false;
    }
    const char *k = json_node_get_string(key);
    if (json_object_has_member(obj, k)) {
        perr(p, "duplicate key");
        return false;
    }
    json_object_set_member(obj, k, g_steal_pointer(&value));
    return true;
}

static JsonNode *parse_object(Parser *p)
{
    g_autoptr(JsonObject) obj = json_object_new();
    const Token *t = peek(p);

    if (!t) {
        perr(p, "premature EOI");
        return NULL;
    }
    if (t->type == TOK_RCURLY) {
        next(p);
    } else {
        for (;;) {
            if (!parse_pair(p, obj)) {
                return NULL;
            }
            t = next(p);
            if (!t) {
                perr(p, "premature EOI");
                return NULL;
            }
            if (t->type == TOK_RCURLY) {
                break;
            }
            if (t->type != TOK_COMMA) {
                perr(p, "expected separator in dict");
                return NULL;
            }
        }
    }
    JsonNode *n = json_node_alloc();
    json_node_init_object(n, obj);
    return n;
}

static JsonNode *parse_array(Parser *p)
{
    g_autoptr(JsonArray) arr = json_array_new();
    const Token *t = peek(p);

    if (!t) {
        perr(p, "premature EOI");
        return NULL;
    }
    if (t->type == TOK_RSQUARE) {
        next(p);
    } else {
        for (;;) {
            JsonNode *v = parse_value(p);
            if (!v) {
                return NULL;
            }
            json_array_add_element(arr, v);
            t = next(p);
            if (!t) {
                perr(p, "premature EOI");
                return NULL;
            }
            if (t->type == TOK_RSQUARE) {
                break;
            }
            if (t->type != TOK_COMMA) {
                perr(p, "expected separator in list");
                return NULL;
            }
        }
    }
    JsonNode *n = json_node_alloc();
    json_node_init_array(n, arr);
    return n;
}

static JsonNode *parse_value(Parser *p)
{
    const Token *t = next(p);

    if (!t) {
        perr(p, "premature EOI");
        return NULL;
    }
    switch (t->type) {
    case TOK_LCURLY:
        return parse_object(p);
    case TOK_LSQUARE:
        return parse_array(p);
    case TOK_STRING:
        return parse_string(p, t);
    case TOK_INTEGER:
    case TOK_FLOAT:
        return parse_number(p, t);
    case TOK_KEYWORD:
        return parse_keyword(p, t);
    default:
        perr(p, "expecting value");
        return NULL;
    }
}

static JsonNode *parse_tokens(const char *text, const Token *toks, guint n,
                              GError **error)
{
    Parser p = { text, toks, n, 0, NULL };
    JsonNode *v = parse_value(&p);

    if (p.err) {
        if (v) {
            json_node_unref(v);
        }
        g_propagate_error(error, p.err);
        return NULL;
    }
    return v;
}

typedef struct {
    JsonNode *value;
    GError *error;
    unsigned count;
} ParseOne;

static void parse_one_cb(JsonNode *value, GError *error, void *opaque)
{
    ParseOne *po = opaque;

    if (po->count++ == 0) {
        po->value = value;
        po->error = error;
        return;
    }
    if (value) {
        json_node_unref(value);
    }
    if (error) {
        g_error_free(error);
    }
}

JsonNode *strata_json_parse_text(const char *text, GError **error)
{
    ParseOne po = { 0 };
    g_autoptr(StrataJsonStream) js = strata_json_stream_new(parse_one_cb,
                                                            &po);

    g_return_val_if_fail(text != NULL, NULL);
    strata_json_stream_feed(js, text, strlen(text));
    strata_json_stream_flush(js);
    if (po.count > 1) {
        if (po.value) {
            json_node_unref(po.value);
        }
        g_clear_error(&po.error);
        g_set_error_literal(error, STRATA_ERROR,
                            STRATA_ERROR_INVALID_ARGUMENT,
                            "Expected a single JSON value");
        return NULL;
    }
    if (po.count == 0) {
        g_set_error_literal(error, STRATA_ERROR,
                            STRATA_ERROR_INVALID_ARGUMENT,
                            "Expected a JSON value");
        return NULL;
    }
    if (po.error) {
        g_propagate_error(error, po.error);
        return NULL;
    }
    return po.value;
}

/* ------------------------------------------------------------------ */
/* Writer                                                              */
/* ------------------------------------------------------------------ */

/* Whether @c leaves as it is. */
static inline bool plain_char(unsigned char c)
{
    return c >= 0x20 && c < 0x7F && c != '"' && c != '\\';
}

static void write_string(GString *out, const char *s)
{
    const char *p = s;

    g_string_append_c(out, '"');
    while (*p) {
        const char *run = p;
        unsigned char c;

        /* Most strings are plain through and through: one copy. */
        while (plain_char((unsigned char)*p)) {
            p++;
        }
        if (p > run) {
            g_string_append_len(out, run, p - run);
        }
        c = (unsigned char)*p;
        if (!c) {
            break;
        }
        if (c < 0x80) {
            switch (c) {
            case '"': g_string_append(out, "\\\""); break;
            case '\\': g_string_append(out, "\\\\"); break;
            case '\b': g_string_append(out, "\\b"); break;
            case '\f': g_string_append(out, "\\f"); break;
            case '\n': g_string_append(out, "\\n"); break;
            case '\r': g_string_append(out, "\\r"); break;
            case '\t': g_string_append(out, "\\t"); break;
            default:
                /* The other controls and DEL: plain_char() took the rest. */
                g_string_append_printf(out, "\\u%04X", c);
            }
            p++;
            continue;
        }
        /* Non-ASCII leaves as escapes, upper-case hex, as QEMU writes
         * it; bytes that are not UTF-8 become U+FFFD. */
        gunichar cp = g_utf8_get_char_validated(p, -1);
        if (cp == (gunichar)-1 || cp == (gunichar)-2) {
            g_string_append(out, "\\uFFFD");
            p++;
            continue;
        }
        if (cp > 0xFFFF) {
            gunichar v = cp - 0x10000;
            g_string_append_printf(out, "\\u%04X\\u%04X", 0xD800 + (v >> 10),
                                   0xDC00 + (v & 0x3FF));
        } else {
            g_string_append_printf(out, "\\u%04X", cp);
        }
        p = g_utf8_next_char(p);
    }
    g_string_append_c(out, '"');
}

/* As printf's %" G_GINT64_FORMAT " would, without its cost. */
static void write_int(GString *out, gint64 v)
{
    char buf[24];
    char *end = buf + sizeof(buf), *p = end;
    guint64 u = v < 0 ? -(guint64)v : (guint64)v;

    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) {
        *--p = '-';
    }
    g_string_append_len(out, p, end - p);
}

static void write_node(GString *out, JsonNode *node, int indent,
                       GHashTable *texts)
{
    bool pretty = indent >= 0;

    if (!node) {
        g_string_append(out, "null");
        return;
    }
    switch (json_node_get_node_type(node)) {
    case JSON_NODE_OBJECT: {
        JsonObjectIter it;
        const char *name;
        JsonNode *member;
        bool first = true;
        const char *text;

        if (texts && !pretty &&
            (text = g_hash_table_lookup(texts, json_node_get_object(node)))) {
            g_string_append(out, text);
            break;
        }
        json_object_iter_init_ordered(&it, json_node_get_object(node));
        g_string_append_c(out, '{');
        while (json_object_iter_next_ordered(&it, &name, &member)) {
            if (!first) {
                g_string_append(out, pretty ? "," : ", ");
            }
            if (pretty) {
                g_string_append_printf(out, "\n%*s", indent + 4, "");
            }
            first = false;
            write_string(out, name);
            g_string_append(out, ": ");
            write_node(out, member, pretty ? indent + 4 : -1, texts);
        }
        if (pretty && !first) {
            g_string_append_printf(out, "\n%*s", indent, "");
        }
        g_string_append_c(out, '}');
        break;
    }
    case JSON_NODE_ARRAY: {
        JsonArray *arr = json_node_get_array(node);
        guint n = json_array_get_length(arr);

        g_string_append_c(out, '[');
        for (guint i = 0; i < n; i++) {
            if (i) {
                g_string_append(out, pretty ? "," : ", ");
            }
            if (pretty) {
                g_string_append_printf(out, "\n%*s", indent + 4, "");
            }
            write_node(out, json_array_get_element(arr, i),
                       pretty ? indent + 4 : -1, texts);
        }
        if (pretty && n) {
            g_string_append_printf(out, "\n%*s", indent, "");
        }
        g_string_append_c(out, ']');
        break;
    }
    case JSON_NODE_NULL:
        g_string_append(out, "null");
        break;
    case JSON_NODE_VALUE:
        switch (json_node_get_value_type(node)) {
        case G_TYPE_INT64:
            write_int(out, json_node_get_int(node));
            break;
        case G_TYPE_DOUBLE: {
            char buf[G_ASCII_DTOSTR_BUF_SIZE];
            double d = json_node_get_double(node);
            /* JSON has no inf or nan; QEMU never produces them either. */
            if (!isfinite(d)) {
                g_string_append(out, "null");
            } else {
                g_string_append(out,
                                g_ascii_formatd(buf, sizeof(buf), "%.17g",
                                                d));
            }
            break;
        }
        case G_TYPE_BOOLEAN:
            g_string_append(out, json_node_get_boolean(node) ? "true"
                                                             : "false");
            break;
        case G_TYPE_STRING:
            write_string(out, json_node_get_string(node));
            break;
        default:
            g_string_append(out, "null");
        }
        break;
    }
}

void strata_json_write(GString *out, JsonNode *node)
{
    g_return_if_fail(out != NULL);
    write_node(out, node, -1, NULL);
}

char *strata_json_to_string(JsonNode *node)
{
    return strata_json_to_string_with(node, NULL);
}

char *strata_json_to_string_with(JsonNode *node, GHashTable *texts)
{
    GString *out = g_string_new(NULL);
    write_node(out, node, -1, texts);
    return g_string_free(out, FALSE);
}

char *strata_json_to_pretty_string(JsonNode *node)
{
    GString *out = g_string_new(NULL);
    write_node(out, node, 0, NULL);
    return g_string_free(out, FALSE);
}
