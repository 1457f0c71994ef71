use super::*;

// --- the processes -------------------------------------------------------------------------------

/// Who the process runs as.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunAs {
    /// None: root.
    pub(crate) uid: Option<u32>,
    pub(crate) ambient: Vec<String>,
    pub(crate) bounding: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Server,
    Relay,
    Agent,
    Client,
}

/// A process as the deploy files start it.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    /// Namespace and log name.
    pub(crate) name: &'static str,
    /// Which files, for messages.
    pub(crate) from: String,
    pub(crate) program: String,
    pub(crate) args: Vec<String>,
    /// Merged in the platform's precedence order: the last writer of a key wins.
    pub(crate) env: BTreeMap<String, Setting>,
    /// systemd `EnvironmentFile=`: (path, optional, where).
    pub(crate) env_files: Vec<(String, bool, String)>,
    pub(crate) user: RunAs,
    pub(crate) sysctls: Vec<(String, String)>,
    /// Dirs the platform makes for the process, owned by its user.
    pub(crate) state_dirs: Vec<String>,
    /// systemd `LoadCredential=`: (id, source).
    pub(crate) credentials: Vec<(String, String)>,
    pub(crate) healthcheck: Option<(Vec<String>, String)>,
    /// Compose `ports:`: (container port, protocol, where).
    pub(crate) published: Vec<(u16, String, String)>,
    /// The server whose token (agents, clients) or relay bundle (relays) it uses.
    pub(crate) joins: Option<&'static str>,
    /// Settings from this file may be meant for another command of the same image.
    pub(crate) foreign_ok: Option<&'static str>,
}

impl Launch {
    pub(crate) fn new(name: &'static str, from: String, joins: Option<&'static str>) -> Launch {
        Launch {
            name,
            from,
            program: String::new(),
            args: vec![],
            env: BTreeMap::new(),
            env_files: vec![],
            user: RunAs::default(),
            sysctls: vec![],
            state_dirs: vec![],
            credentials: vec![],
            healthcheck: None,
            published: vec![],
            joins,
            foreign_ok: None,
        }
    }

    pub(crate) fn set(&mut self, settings: impl IntoIterator<Item = Setting>) {
        for s in settings {
            self.env.insert(s.key.clone(), s);
        }
    }

    pub(crate) fn role(&self) -> Role {
        let base = self.program.rsplit('/').next().unwrap_or_default();
        match (base, self.args.first().map(String::as_str)) {
            ("tunnel-server", Some("relay")) => Role::Relay,
            ("tunnel-server", None) => Role::Server,
            ("tunnel-agent", None) => Role::Agent,
            ("tunnelctl", Some("up")) => Role::Client,
            _ => panic!(
                "{}: runs `{} {}`, which this test does not know",
                self.from,
                self.program,
                self.args.join(" ")
            ),
        }
    }
}

// --- reading the files -----------------------------------------------------------------------------

pub(crate) fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

pub(crate) struct Files {
    pub(crate) root: PathBuf,
    pub(crate) stages: BTreeMap<String, Stage>,
}

impl Files {
    pub(crate) fn new() -> Files {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();
        let stages = tunnel_tests::deploy::dockerfile::stages(
            &std::fs::read_to_string(root.join(DOCKERFILE)).unwrap(),
            DOCKERFILE,
        );
        Files { root, stages }
    }

    pub(crate) fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root.join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
    }

    pub(crate) fn stage(&self, name: &str) -> &Stage {
        self.stages.get(name).unwrap_or_else(|| panic!("{DOCKERFILE}: no stage '{name}'"))
    }

    /// A container of a stage's image, as it starts with no arguments.
    pub(crate) fn container(
        &self,
        name: &'static str,
        target: &str,
        from: String,
        joins: Option<&'static str>,
    ) -> Launch {
        let s = self.stage(target);
        let mut l = Launch::new(name, from, joins);
        let (program, args) =
            s.entrypoint.split_first().unwrap_or_else(|| panic!("{DOCKERFILE}: {target}: no ENTRYPOINT"));
        (l.program, l.args) = (program.clone(), args.iter().chain(&s.cmd).cloned().collect());
        l.set(s.env.iter().cloned());
        l.user.uid = match s.user.as_deref().map(|u| u.split(':').next().unwrap()) {
            None | Some("0" | "root") => None,
            Some(u) => {
                Some(u.parse().unwrap_or_else(|_| panic!("{DOCKERFILE}: {target}: USER {u}: not numeric")))
            }
        };
        l.state_dirs = s.owned_dirs.clone();
        l.healthcheck = s.healthcheck.clone();
        l
    }

    pub(crate) fn compose(
        &self,
        name: &'static str,
        file: &str,
        service: &str,
        examples: bool,
        joins: Option<&'static str>,
    ) -> Launch {
        let doc = Yaml::parse(&self.read(file));
        let svc = doc
            .get("services")
            .and_then(|s| s.get(service))
            .unwrap_or_else(|| panic!("{file}: no {service}"));
        for key in ["command", "entrypoint", "user", "environment_file"] {
            assert!(
                svc.get(key).is_none(),
                "{file}: services.{service}.{key} is not read by this test yet: teach it"
            );
        }
        let build = svc.get("build").unwrap_or_else(|| panic!("{file}: services.{service} has no build"));
        let dir = Path::new(file).parent().unwrap();
        let df = normalize(
            &dir.join(build.get("context").unwrap().str()).join(build.get("dockerfile").unwrap().str()),
        );
        assert!(
            df == Path::new(DOCKERFILE),
            "{file}: services.{service}.build names {df:?}, not {DOCKERFILE}"
        );
        let target = build.get("target").unwrap().str();
        let what = if examples { " with the env file's commented-out examples" } else { "" };
        let from = format!("{file} services.{service}{what} ({DOCKERFILE} target {target})");
        let mut l = self.container(name, target, from, joins);
        // Docker's order: the image's ENV, then env_file, then environment.
        for f in svc.get("env_file").map(Yaml::items).unwrap_or_default() {
            let example = dir.join(format!("{f}.example")).to_string_lossy().into_owned();
            let (on, off) = env_file(&self.read(&example), &example);
            l.set(on);
            if examples {
                l.set(off.into_iter().filter(|s| !NOT_RUN_HERE.iter().any(|(k, _)| *k == s.key)));
            }
        }
        for (k, v, n) in svc.get("environment").map(Yaml::pairs).unwrap_or_default() {
            assert!(!v.contains("${"), "{file}:{n}: interpolation is not read by this test");
            l.set([Setting::new(&k, &v, format!("{file}:{n}"))]);
        }
        l.sysctls = svc
            .get("sysctls")
            .map(Yaml::pairs)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v, _)| (k, v))
            .collect();
        if let Some(Yaml::List(ports)) = svc.get("ports") {
            for (p, n) in ports {
                let (spec, proto) = p.split_once('/').unwrap_or((p, "tcp"));
                let port = spec
                    .rsplit(':')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap_or_else(|_| panic!("{file}:{n}: port '{p}'"));
                l.published.push((port, proto.to_owned(), format!("{file}:{n}")));
            }
        }
        l
    }

    pub(crate) fn unit(&self, name: &'static str, file: &str, joins: Option<&'static str>) -> Launch {
        let u = service_unit(&self.read(file), file);
        let mut l = Launch::new(name, file.to_owned(), joins);
        (l.program, l.args) = (u.program().to_owned(), u.args().to_vec());
        l.set(u.environment);
        l.env_files = u.environment_files.into_iter().map(|f| (f.path, f.optional, f.at)).collect();
        l.credentials = u.credentials;
        if u.dynamic_user {
            l.user.uid = Some(DYNAMIC_UID);
        }
        l.user.ambient = u.ambient_capabilities;
        l.user.bounding = u.capability_bounding_set;
        l.state_dirs = u.state_directories.iter().map(|d| format!("/var/lib/{d}")).collect();
        l
    }

    /// The server image run as a relay, as the Dockerfile's comment describes it.
    pub(crate) fn docker_relay(&self, name: &'static str, joins: Option<&'static str>) -> Launch {
        let notes: String = self.stage("server").notes.iter().map(|(c, _)| format!("{c} ")).collect();
        let missing = "deploy/Dockerfile: the server stage no longer says how to run a relay (command `...` with TUNNEL_...)";
        let start = notes.find("command `").expect(missing) + "command `".len();
        let cmd = &notes[start..start + notes[start..].find('`').expect(missing)];
        let var: String = notes[start..]
            .split_whitespace()
            .find(|w| w.starts_with("TUNNEL_"))
            .expect(missing)
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let from = format!("{DOCKERFILE} target server with command `{cmd}`");
        let mut l = self.container(name, "server", from, joins);
        l.args.extend(cmd.split_whitespace().map(str::to_owned));
        l.sysctls = DOCKER_SYSCTLS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        l.foreign_ok = Some(DOCKERFILE);
        l.set(operator_supplied(name));
        assert!(
            l.env.contains_key(&var),
            "OPERATOR_SUPPLIED has no {var} for {name}, which {DOCKERFILE} asks for"
        );
        l
    }

    /// The client image: as it starts by default, or in TUN mode as its `docker run` comment says.
    pub(crate) fn docker_client(&self, name: &'static str, tun: bool, joins: Option<&'static str>) -> Launch {
        let stage = self.stage("client");
        let from =
            format!("{DOCKERFILE} target client{}", if tun { ", its `docker run` for TUN mode" } else { "" });
        let mut l = self.container(name, "client", from, joins);
        l.sysctls = DOCKER_SYSCTLS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if tun {
            let (user, env) = docker_run(stage, DOCKERFILE)
                .unwrap_or_else(|| panic!("{DOCKERFILE}: client: no `docker run` example"));
            if let Some(u) = user {
                l.user.uid = Some(u.parse().unwrap()).filter(|&u| u != 0);
            }
            l.set(env);
        } else {
            l.set(documented_options(stage, DOCKERFILE));
            l.set(operator_supplied(name));
        }
        l
    }

    /// Every process the deploy files describe, and the server each joins.
    pub(crate) fn launches(&self) -> Vec<Launch> {
        let (server, agent) = ("deploy/docker-compose.yml", "deploy/agent/docker-compose.yml");
        vec![
            self.compose("srv", server, "server", false, None),
            self.compose("srvx", server, "server", true, None),
            self.unit("usrv", "deploy/systemd/tunnel-server.service", None),
            self.unit("urelay", "deploy/systemd/tunnel-relay.service", Some("srv")),
            self.docker_relay("drelay", Some("srv")),
            self.compose("agent", agent, "agent", false, Some("srv")),
            self.compose("agentx", agent, "agent", true, Some("srvx")),
            self.unit("uagent", "deploy/systemd/tunnel-agent.service", Some("srv")),
            self.unit("uclient", "deploy/systemd/tunnel-client.service", Some("srv")),
            self.docker_client("dclient", false, Some("srv")),
            self.docker_client("dclienttun", true, Some("srv")),
        ]
    }
}

pub(crate) fn operator_supplied(name: &str) -> Vec<Setting> {
    OPERATOR_SUPPLIED
        .iter()
        .filter(|(l, ..)| *l == name)
        .map(|(_, k, v, _)| Setting::new(k, v, "OPERATOR_SUPPLIED in this test"))
        .collect()
}
