// Long-option parsing shared by every subcommand.
//
//   ArgParser parser("switchyard bench comm", "Measure collective bandwidth.");
//   parser.add_option("sizes", "LIST", "message sizes in bytes", "1M,16M,256M");
//   parser.add_flag("json", "also print JSON");
//   parser.add_positional("config", "YAML config file", /*required=*/true);
//   if (!parser.parse(argc, argv)) return 0;          // --help was printed
//   int64_t iterations = parser.get_int("iterations");
//
// Accepted forms: --name VALUE, --name=VALUE, --flag, -h/--help. Options marked repeatable
// collect every occurrence (get_all). An unknown option, a missing value, a missing required
// positional or an extra positional throws SY_BAD_INPUT naming it (exit code 2 from main).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace switchyard {

class ArgParser {
 public:
  ArgParser(std::string command, std::string summary);

  void add_flag(const std::string& name, const std::string& help);
  void add_option(const std::string& name, const std::string& value_name, const std::string& help,
                  const std::string& default_value = "", bool repeatable = false);
  void add_positional(const std::string& name, const std::string& help, bool required = true);
  void add_epilog(const std::string& text);  // free text after the option list (examples)

  // argv[0] is the command itself (e.g. "train"); returns false when --help was printed.
  bool parse(int argc, char** argv);

  bool flag(const std::string& name) const;
  bool has(const std::string& name) const;  // given on the command line (or positional present)
  std::string get(const std::string& name) const;  // value or default
  int64_t get_int(const std::string& name) const;    // SY_BAD_INPUT if not an integer
  double get_double(const std::string& name) const;  // SY_BAD_INPUT if not a number
  std::vector<std::string> get_all(const std::string& name) const;
  std::string usage() const;

 private:
  struct Option {
    std::string name, value_name, help, default_value;
    bool is_flag = false, repeatable = false;
  };
  struct Positional {
    std::string name, help;
    bool required = true;
  };
  std::string command_, summary_, epilog_;
  std::vector<Option> options_;
  std::vector<Positional> positionals_;
  std::map<std::string, std::vector<std::string>> values_;
  std::map<std::string, bool> flags_;
};

}  // namespace switchyard
