package streamwallet.peer;

/** Amounts as the project writes them ("12.34", two decimals for every currency the bench uses) in minor units. */
final class Money {
    private Money() {}

    static final int MINOR_DIGITS = 2;
    /** Far above any balance the bench reaches; an amount above it is refused as invalid. */
    static final long AMOUNT_MINOR_MAX = 1_000_000_000_000_000L;

    /** The amount in minor units, or -1 if the text is not a positive amount of at most two decimals. */
    static long parseMinor(String text) {
        if (text == null || text.isEmpty() || text.length() > 24) {
            return -1;
        }
        long whole = 0;
        int i = 0;
        int length = text.length();
        for (; i < length && text.charAt(i) != '.'; i++) {
            char c = text.charAt(i);
            if (c < '0' || c > '9') {
                return -1;
            }
            whole = whole * 10 + (c - '0');
        }
        if (i == 0) {
            return -1;
        }
        long fraction = 0;
        int fractionDigits = 0;
        if (i < length) {
            for (i++; i < length; i++, fractionDigits++) {
                char c = text.charAt(i);
                if (c < '0' || c > '9' || fractionDigits == MINOR_DIGITS) {
                    return -1;
                }
                fraction = fraction * 10 + (c - '0');
            }
            if (fractionDigits == 0) {
                return -1;
            }
        }
        for (; fractionDigits < MINOR_DIGITS; fractionDigits++) {
            fraction *= 10;
        }
        long minor = whole * 100 + fraction;
        return minor > 0 && minor <= AMOUNT_MINOR_MAX ? minor : -1;
    }

    static String format(long minor) {
        assert minor >= 0 : "a balance below zero: " + minor;
        long fraction = minor % 100;
        return (minor / 100) + (fraction < 10 ? ".0" : ".") + fraction;
    }
}
