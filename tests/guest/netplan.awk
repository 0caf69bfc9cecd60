# Reads a netplan v2 network-config (as cloud-init NoCloud takes it, with or without the "network:"
# wrapper) and prints one line per ethernet: "ID MAC ADDRESSES GATEWAY", with "-" for what is missing
# and ADDRESSES comma-separated. Block and flow style are understood for match, addresses and routes
# (gateway4, or a route to default/0.0.0.0/0); every other key is ignored. Runs on busybox awk.

function path(   p, i) {
    p = ""
    for (i = 1; i <= depth; i++)
        p = p "/" keys[i]
    return p "/"
}

# The ethernet id in path p, or "" when p is not inside "ethernets".
function ethernet_of(p,   i, rest) {
    i = index(p, "/ethernets/")
    if (!i)
        return ""
    rest = substr(p, i + 11)
    return substr(rest, 1, index(rest, "/") - 1)
}

# The part of path p below its ethernet id, without slashes around ("" for the ethernet itself).
function relative_of(p, id,   rest) {
    rest = substr(p, index(p, "/ethernets/" id "/") + 12 + length(id))
    sub(/\/$/, "", rest)
    return rest
}

function ethernet(p,   id) {
    id = ethernet_of(p)
    if (id != "" && !(id in mac)) {
        order[++count] = id
        mac[id] = "-"
        addresses[id] = ""
        gateway[id] = "-"
    }
    return id
}

function item_started(p,   id) {
    id = ethernet(p)
    if (id != "" && relative_of(p, id) == "routes") {
        route_to[id] = ""
        route_via[id] = ""
    }
}

function scalar_item(p, value,   id) {
    id = ethernet(p)
    if (id != "" && relative_of(p, id) == "addresses")
        addresses[id] = addresses[id] (addresses[id] == "" ? "" : ",") value
}

function pair(p, key, value,   id, rel) {
    id = ethernet(p)
    if (id == "")
        return
    rel = relative_of(p, id)
    if (rel == "match" && key == "macaddress")
        mac[id] = tolower(value)
    else if (rel == "" && key == "gateway4")
        gateway[id] = value
    else if (rel == "routes" && key == "to")
        route_to[id] = value
    else if (rel == "routes" && key == "via")
        route_via[id] = value
    if (rel == "routes" && (route_to[id] == "default" || route_to[id] == "0.0.0.0/0") && route_via[id] != "")
        gateway[id] = route_via[id]
}

function trim(s) {
    gsub(/^[ \t]+|[ \t]+$/, "", s)
    return s
}

# Splits "key: value" (a MAC address has colons but no space after them) into KEY and VALUE.
function split_pair(s,   i) {
    if (match(s, /:( |$)/)) {
        KEY = trim(substr(s, 1, RSTART - 1))
        VALUE = trim(substr(s, RSTART + 1))
        return 1
    }
    return 0
}

function flow_map(p, s,   n, parts, i) {
    gsub(/^[ \t]*\{|\}[ \t]*$/, "", s)
    n = split(s, parts, ",")
    for (i = 1; i <= n; i++)
        if (split_pair(parts[i]))
            pair(p, KEY, VALUE)
}

function flow_list(p, s,   n, parts, i) {
    gsub(/^[ \t]*\[|\][ \t]*$/, "", s)
    if (index(s, "{")) {
        n = split(s, parts, "}")
        for (i = 1; i <= n; i++) {
            if (!index(parts[i], "{"))
                continue
            item_started(p)
            flow_map(p, substr(parts[i], index(parts[i], "{")) "}")
        }
        return
    }
    n = split(s, parts, ",")
    for (i = 1; i <= n; i++)
        if (trim(parts[i]) != "") {
            item_started(p)
            scalar_item(p, trim(parts[i]))
        }
}

{
    line = $0
    sub(/\r$/, "", line)
    gsub(/["']/, "", line)
    sub(/(^|[ \t])#.*$/, "", line)
    if (line ~ /^[ \t]*$/)
        next
    match(line, /^ */)
    indent = RLENGTH
    line = substr(line, indent + 1)

    if (line ~ /^-( |$)/) {
        # A list item belongs to the key above it, which YAML allows at the same indent as the dash.
        while (depth > 0 && key_indent[depth] > indent)
            depth--
        line = substr(line, 2)
        match(line, /^ */)
        indent += 1 + RLENGTH
        line = substr(line, RLENGTH + 1)
        item_started(path())
        if (line ~ /^\{/) {
            flow_map(path(), line)
            next
        }
        if (!split_pair(line)) {
            if (line != "")
                scalar_item(path(), line)
            next
        }
    } else {
        while (depth > 0 && key_indent[depth] >= indent)
            depth--
        if (!split_pair(line))
            next
    }

    if (VALUE == "") {
        keys[++depth] = KEY
        key_indent[depth] = indent
    } else if (VALUE ~ /^\[/) {
        flow_list(path() KEY "/", VALUE)
    } else if (VALUE ~ /^\{/) {
        flow_map(path() KEY "/", VALUE)
    } else {
        pair(path(), KEY, VALUE)
    }
}

END {
    for (i = 1; i <= count; i++) {
        id = order[i]
        print id, mac[id], (addresses[id] == "" ? "-" : addresses[id]), gateway[id]
    }
}
