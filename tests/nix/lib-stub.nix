# A stand-in for the small part of nixpkgs that nixos-module.nix and flake.nix use, so that
# tests evaluate them with the real nix-instantiate where nixpkgs cannot be fetched:
# - `lib`: the functions they call, with nixpkgs' semantics for the cases they use;
# - `pkgs`: formats.toml (a TOML writer for config.toml's shapes), writeShellScript (via
#   builtins.toFile, so that tests can run the scripts with bash), and fake packages;
# - `utils.escapeSystemdExecArgs`, as NixOS defines it;
# - `nixpkgs`: flake inputs for flake.nix, whose fetchurl and mkDerivation record their
#   arguments instead of building;
# - `evalModule module definitions`: a tiny module system. The module's options are
#   filled from `definitions` (type-checked; a definition no option declares is an error)
#   or from their defaults; its `config` is resolved (mkIf, mkMerge, mkDefault, mkAfter)
#   and merged the NixOS way for the shapes used here (lists concatenated, attribute sets
#   merged, equal values kept, other conflicts an error). It returns `config` (what the
#   module defines), `cfg` (the option values), and the failed assertions and warnings.
{ }:

let
  inherit (builtins)
    all
    attrNames
    concatStringsSep
    filter
    isAttrs
    isBool
    isInt
    isFloat
    isList
    isString
    length
    listToAttrs
    mapAttrs
    match
    replaceStrings
    stringLength
    substring
    toJSON
    ;

  # Fake store paths: 32 characters of the Nix base-32 alphabet, then the name.
  fakeOutPath =
    name:
    "/nix/store/"
    + replaceStrings [ "e" ] [ "f" ] (substring 0 32 (builtins.hashString "sha256" name))
    + "-${name}";
  fakePackage = name: {
    type = "derivation";
    inherit name;
    outPath = fakeOutPath name;
  };

  mkType = name: check: {
    _type = "option-type";
    inherit name check;
  };

  lib = rec {
    types = {
      bool = mkType "boolean" isBool;
      str = mkType "string" isString;
      port = mkType "16 bit unsigned integer" (v: isInt v && v >= 0 && v <= 65535);
      package = mkType "package" (v: isAttrs v && v ? outPath);
      attrs = mkType "attribute set" isAttrs;
      nullOr = t: mkType "null or ${t.name}" (v: v == null || t.check v);
      listOf = t: mkType "list of ${t.name}" (v: isList v && all t.check v);
    };

    mkOption = attrs: attrs // { _type = "option"; };
    mkEnableOption = name: mkOption {
      type = types.bool;
      default = false;
      example = true;
      description = "Whether to enable ${name}.";
    };
    mkIf = condition: content: {
      _type = "if";
      inherit condition content;
    };
    mkMerge = contents: {
      _type = "merge";
      inherit contents;
    };
    mkOverride = priority: content: {
      _type = "override";
      inherit priority content;
    };
    mkDefault = mkOverride 1000;
    mkAfter = content: {
      _type = "order";
      priority = 1500;
      inherit content;
    };
    literalExpression = text: {
      _type = "literalExpression";
      inherit text;
    };

    optional = condition: value: if condition then [ value ] else [ ];
    optionals = condition: values: if condition then values else [ ];
    optionalAttrs = condition: attrs: if condition then attrs else { };
    optionalString = condition: text: if condition then text else "";
    concatMapStrings = f: list: concatStringsSep "" (map f list);
    genAttrs =
      names: f:
      listToAttrs (
        map (name: {
          inherit name;
          value = f name;
        }) names
      );

    hasPrefix = prefix: text: substring 0 (stringLength prefix) text == prefix;
    hasSuffix =
      suffix: text:
      let
        n = stringLength suffix;
        l = stringLength text;
      in
      l >= n && substring (l - n) n text == suffix;
    hasInfix =
      infix: text:
      let
        n = stringLength infix;
        l = stringLength text;
        from = i: i + n <= l && (substring i n text == infix || from (i + 1));
      in
      from 0;
    removeSuffix =
      suffix: text:
      if hasSuffix suffix text then
        substring 0 (stringLength text - stringLength suffix) text
      else
        text;
    escapeShellArg =
      arg:
      let
        text = toString arg;
      in
      if match "[[:alnum:],._+:@%/-]+" text == null then
        "'${replaceStrings [ "'" ] [ "'\\''" ] text}'"
      else
        text;
    escapeShellArgs = args: concatStringsSep " " (map escapeShellArg args);

    # flake.nix hands these to mkDerivation, which the stand-in never builds.
    fileset = {
      unions = list: {
        _type = "fileset";
        inherit list;
      };
      toSource = args: args;
    };
  };

  utils = {
    escapeSystemdExecArg =
      arg:
      let
        text = if isString arg then arg else toString arg;
      in
      replaceStrings [ "%" "$" ] [ "%%" "$$" ] (toJSON text);
    escapeSystemdExecArgs = args: concatStringsSep " " (map utils.escapeSystemdExecArg args);
  };

  # TOML for the shapes config.toml has: scalars, lists of scalars, tables, arrays of tables.
  toml =
    let
      key = k: if match "[A-Za-z0-9_-]+" k != null then k else toJSON k;
      scalar =
        v:
        if isString v then
          toJSON v
        else if isBool v then
          (if v then "true" else "false")
        else if isInt v || isFloat v then
          toString v
        else if isList v then
          "[" + concatStringsSep ", " (map scalar v) + "]"
        else
          throw "TOML cannot hold ${toJSON v}";
      isTableArray = v: isList v && v != [ ] && all isAttrs v;
      body =
        path: attrs:
        let
          names = attrNames attrs;
          plain = filter (n: !(isAttrs attrs.${n}) && !(isTableArray attrs.${n})) names;
          tables = filter (n: isAttrs attrs.${n}) names;
          arrays = filter (n: isTableArray attrs.${n}) names;
          header = n: concatStringsSep "." (map key (path ++ [ n ]));
        in
        concatStringsSep "" (map (n: "${key n} = ${scalar attrs.${n}}\n") plain)
        + concatStringsSep "" (map (n: "\n[${header n}]\n" + body (path ++ [ n ]) attrs.${n}) tables)
        + concatStringsSep "" (
          map (
            n: concatStringsSep "" (map (t: "\n[[${header n}]]\n" + body (path ++ [ n ]) t) attrs.${n})
          ) arrays
        );
    in
    body [ ];

  pkgs = {
    formats.toml = _: {
      type = lib.types.attrs;
      generate = name: value: builtins.toFile name (toml value);
    };
    writeShellScript = name: text: builtins.toFile name "#!/usr/bin/env bash\n${text}";
    pares-arca = fakePackage "pares-arca-0.1.0";
  };

  # nixpkgs as flake.nix sees it.
  recordDerivation =
    args: args // (args.passthru or { }) // fakePackage (args.name or "${args.pname}-${args.version}");
  flakePackages = system: {
    deno = fakePackage "deno-2.9.6";
    nix = fakePackage "nix-2.8.0";
    zstd = fakePackage "zstd-1.5.5";
    xz = fakePackage "xz-5.4.1";
    makeBinaryWrapper = fakePackage "make-binary-wrapper-hook";
    autoPatchelfHook = fakePackage "auto-patchelf-hook";
    fetchurl = args: fakePackage (baseNameOf args.url) // { inherit (args) url hash; };
    mkShell = args: fakePackage "nix-shell" // args;
    stdenv = {
      hostPlatform.system = system;
      cc.cc.lib = fakePackage "gcc-14-lib";
      mkDerivation = recordDerivation;
    };
    stdenvNoCC = {
      hostPlatform.system = system;
      mkDerivation = recordDerivation;
    };
  };
  nixpkgs = {
    inherit lib;
    legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] flakePackages;
  };

  isOption = v: isAttrs v && (v._type or null) == "option";
  showPath = concatStringsSep ".";

  checked =
    path: decl: value:
    if decl ? type && !(decl.type.check value) then
      throw "The option `${showPath path}' is not of type ${decl.type.name}: ${toJSON value}"
    else
      value;

  # Option values from the definitions, or the defaults.
  fill =
    path: decls: defs:
    let
      undeclared = filter (n: !(decls ? ${n})) (attrNames defs);
    in
    if length path >= 2 && undeclared != [ ] then
      throw "The option `${showPath (path ++ [ (builtins.head undeclared) ])}' does not exist"
    else
      mapAttrs (
        name: decl:
        let
          here = path ++ [ name ];
          defined = defs ? ${name};
        in
        if isOption decl then
          if defined then
            checked here decl defs.${name}
          else if decl ? default then
            decl.default
          else
            throw "The option `${showPath here}' is used but not defined"
        else
          fill here decl (if defined then defs.${name} else { })
      ) decls;

  recursiveUpdate =
    a: b:
    a
    // mapAttrs (
      name: value:
      if isAttrs value && isAttrs (a.${name} or null) && !(value ? outPath) then
        recursiveUpdate a.${name} value
      else
        value
    ) b;

  absent = {
    _type = "absent";
  };
  isAbsent = v: isAttrs v && (v._type or null) == "absent";
  isPlainAttrs = v: isAttrs v && !(v ? outPath) && !(v ? _type);

  merge2 =
    a: b:
    if isAbsent a then
      b
    else if isAbsent b then
      a
    else if isPlainAttrs a && isPlainAttrs b then
      a // b // mapAttrs (name: _: merge2 a.${name} b.${name}) (builtins.intersectAttrs a b)
    else if isList a && isList b then
      a ++ b
    else if a == b then
      a
    else
      throw "Conflicting definitions: ${toJSON a} and ${toJSON b}";

  resolve =
    v:
    if isAttrs v && v ? _type then
      if v._type == "if" then
        (if v.condition then resolve v.content else absent)
      else if v._type == "merge" then
        builtins.foldl' merge2 absent (map resolve v.contents)
      else if v._type == "override" || v._type == "order" then
        resolve v.content
      else
        v
    else if isPlainAttrs v then
      let
        resolved = mapAttrs (_: resolve) v;
      in
      removeAbsent resolved
    else
      v;
  removeAbsent =
    attrs:
    listToAttrs (
      map (name: {
        inherit name;
        value = attrs.${name};
      }) (filter (name: !(isAbsent attrs.${name})) (attrNames attrs))
    );

  evalModule =
    module: definitions:
    let
      evaluated = module {
        inherit lib pkgs utils config;
        options = evaluated.options;
      };
      values = fill [ ] evaluated.options definitions;
      config = recursiveUpdate definitions values;
      resolved = resolve (evaluated.config or { });
      defined = if isAbsent resolved then { } else resolved;
    in
    {
      config = defined;
      cfg = values;
      failedAssertions = map (a: a.message) (filter (a: !a.assertion) (defined.assertions or [ ]));
      warnings = defined.warnings or [ ];
    };
in
{
  inherit
    lib
    pkgs
    utils
    nixpkgs
    evalModule
    resolve
    fakePackage
    ;
}
