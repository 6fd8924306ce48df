package streamwallet.peer;

import java.nio.charset.StandardCharsets;
import java.util.HashMap;
import java.util.Map;

/**
 * The project's wire format (schemas/, msgspec JSON) as this peer needs it: every message is one
 * flat JSON object of strings, integers, booleans and nulls. A parser of exactly that, and a writer
 * that lays fields out in the order the Python schema classes encode them.
 */
final class FlatJson {
    private FlatJson() {}

    static final class FormatError extends RuntimeException {
        FormatError(String what, int at) {
            super(what + " at byte " + at);
        }
    }

    /** Values are String, Long, Boolean or null. */
    static Map<String, Object> parse(byte[] data) {
        Parser parser = new Parser(data);
        return parser.object();
    }

    private static final class Parser {
        private final byte[] data;
        private int at;

        Parser(byte[] data) {
            this.data = data;
        }

        Map<String, Object> object() {
            Map<String, Object> fields = new HashMap<>(32);
            space();
            expect('{');
            space();
            if (peek() == '}') {
                at++;
                return fields;
            }
            while (true) {
                space();
                String name = string();
                space();
                expect(':');
                space();
                fields.put(name, value());
                space();
                byte next = data[at++];
                if (next == '}') {
                    return fields;
                }
                if (next != ',') {
                    throw new FormatError("expected , or }", at - 1);
                }
            }
        }

        private Object value() {
            byte first = peek();
            if (first == '"') {
                return string();
            }
            if (first == 't') {
                literal("true");
                return Boolean.TRUE;
            }
            if (first == 'f') {
                literal("false");
                return Boolean.FALSE;
            }
            if (first == 'n') {
                literal("null");
                return null;
            }
            if (first == '-' || (first >= '0' && first <= '9')) {
                return number();
            }
            throw new FormatError("a flat message holds no " + (char) first, at);
        }

        private Long number() {
            boolean negative = data[at] == '-';
            if (negative) {
                at++;
            }
            long value = 0;
            int start = at;
            while (at < data.length && data[at] >= '0' && data[at] <= '9') {
                value = Math.multiplyExact(value, 10) + (data[at++] - '0');
            }
            if (at == start) {
                throw new FormatError("expected a digit", at);
            }
            return negative ? -value : value;
        }

        private String string() {
            expect('"');
            int start = at;
            boolean plain = true;
            while (data[at] != '"') {
                if (data[at] == '\\') {
                    plain = false;
                    at += 2;
                } else {
                    at++;
                }
            }
            int end = at++;
            if (plain) {
                return new String(data, start, end - start, StandardCharsets.UTF_8);
            }
            return unescape(start, end);
        }

        private String unescape(int start, int end) {
            StringBuilder text = new StringBuilder(end - start);
            String raw = new String(data, start, end - start, StandardCharsets.UTF_8);
            for (int i = 0; i < raw.length(); i++) {
                char c = raw.charAt(i);
                if (c != '\\') {
                    text.append(c);
                    continue;
                }
                char e = raw.charAt(++i);
                switch (e) {
                    case '"', '\\', '/' -> text.append(e);
                    case 'b' -> text.append('\b');
                    case 'f' -> text.append('\f');
                    case 'n' -> text.append('\n');
                    case 'r' -> text.append('\r');
                    case 't' -> text.append('\t');
                    case 'u' -> {
                        text.append((char) Integer.parseInt(raw.substring(i + 1, i + 5), 16));
                        i += 4;
                    }
                    default -> throw new FormatError("bad escape \\" + e, start + i);
                }
            }
            return text.toString();
        }

        private void literal(String word) {
            for (int i = 0; i < word.length(); i++) {
                if (data[at + i] != word.charAt(i)) {
                    throw new FormatError("expected " + word, at);
                }
            }
            at += word.length();
        }

        private byte peek() {
            if (at >= data.length) {
                throw new FormatError("unexpected end", at);
            }
            return data[at];
        }

        private void expect(char c) {
            if (peek() != c) {
                throw new FormatError("expected " + c, at);
            }
            at++;
        }

        private void space() {
            while (at < data.length && (data[at] == ' ' || data[at] == '\n' || data[at] == '\r' || data[at] == '\t')) {
                at++;
            }
        }
    }

    /** A compact JSON object, fields in the order they are added (msgspec's: its struct field order). */
    static final class Writer {
        private final StringBuilder out = new StringBuilder(320);
        private boolean first = true;

        private StringBuilder name(String name) {
            out.append(first ? '{' : ',');
            first = false;
            return out.append('"').append(name).append("\":");
        }

        Writer str(String name, String value) {
            if (value == null) {
                name(name).append("null");
                return this;
            }
            name(name).append('"');
            for (int i = 0; i < value.length(); i++) {
                char c = value.charAt(i);
                if (c == '"' || c == '\\') {
                    out.append('\\').append(c);
                } else if (c < 0x20) {
                    out.append(String.format("\\u%04x", (int) c));
                } else {
                    out.append(c);
                }
            }
            out.append('"');
            return this;
        }

        Writer num(String name, long value) {
            name(name).append(value);
            return this;
        }

        Writer bool(String name, boolean value) {
            name(name).append(value);
            return this;
        }

        Writer nil(String name) {
            name(name).append("null");
            return this;
        }

        byte[] bytes() {
            String text = first ? "{}" : out.append('}').toString();
            return text.getBytes(StandardCharsets.UTF_8);
        }
    }
}
